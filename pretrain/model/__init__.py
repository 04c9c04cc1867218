from pretrain.model.gpt import GPT
from pretrain.model.init import init_weights, count_parameters

__all__ = ["GPT", "init_weights", "count_parameters"]
