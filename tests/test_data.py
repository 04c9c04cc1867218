"""Data pipeline behaviour: shard assignment, packing, exact resume (also across DP sizes),
mixtures, corruption handling, the tools, and the embedded corpus."""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import (
    DatasetError,
    Manifest,
    TokenLoader,
    load_tokenizer,
    prepare_embedded_corpus,
    read_manifest,
    save_hf_tokenizer,
    write_manifest,
    write_token_shards,
)
from pretrain.data.packing import iter_pieces
from pretrain.data.sampling import document_permutation, rank_shards
from helpers import HUNG

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def make_dataset(root: Path, num_shards: int = 12, first_value: int = 1, seed: int = 0) -> Path:
    """A dataset whose every token value is unique, so any token identifies its shard and offset."""
    rng = np.random.default_rng(seed)
    docs, value = [], first_value
    for _ in range(num_shards * 8):
        n = int(rng.integers(5, 400))
        docs.append(np.arange(value, value + n, dtype=np.uint16))
        value += n
    root.mkdir(parents=True)
    per_shard = sum(d.size for d in docs) // num_shards + 1
    train = write_token_shards(docs, root, "train", per_shard, np.uint16)
    val = write_token_shards(docs[:6], root, "val", 300, np.uint16)
    write_manifest(root, Manifest(dtype="uint16", splits={"train": train, "val": val}))
    return root


def shard_tokens(dataset: Path, file: str) -> list[np.ndarray]:
    """Documents of a shard, read independently of the loader (WebDataset tar layout)."""
    docs = []
    with tarfile.open(dataset / file) as tar:
        for m in tar.getmembers():
            assert m.name.endswith(".npy")
            docs.append(np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False))
    return docs


def epoch_documents(loader: TokenLoader, epoch: int, lane: int = 0) -> list[np.ndarray]:
    """The documents one lane (row of the micro-batch) of this rank should read in ``epoch``, in
    order: its shards in groups of ``shuffle_shards``, each group's documents in the order
    document_permutation gives them, dealt round-robin to the lanes."""
    shards = loader.assigned_shards(epoch)
    indices = rank_shards(len(loader.sources[0].shards), loader.seed, epoch, loader.dp_rank, loader.dp_size)
    size = max(1, loader.shuffle_shards)
    docs = []
    for g in range(0, len(shards), size):
        group = [d for f in shards[g : g + size] for d in shard_tokens(loader.sources[0].dir, f)]
        if loader.shuffle_shards:
            group = [group[j] for j in document_permutation(len(group), loader.seed, epoch, *indices[g : g + size])]
        docs += group[lane :: loader.lanes]
    return docs


def epoch_stream(loader: TokenLoader, epoch: int, lane: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and expected position ids one lane of this rank should read in ``epoch``, in order."""
    docs = epoch_documents(loader, epoch, lane)
    return np.concatenate(docs).astype(np.int64), np.concatenate([np.arange(d.size) for d in docs])


def take(loader_iter, n: int) -> list:
    return [next(loader_iter) for _ in range(n)]


def inputs_of(batches) -> np.ndarray:
    return np.concatenate([b.input_ids.reshape(-1).numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.position_ids, y.position_ids)


def assert_reads_then_resumes(location, reference: list, **kwargs) -> None:
    """A loader over `location` gives the first half of `reference`; a fresh loader given its state
    gives the second half."""
    half = len(reference) // 2
    loader = TokenLoader(location, **kwargs)
    assert_same_batches(take(iter(loader), half), reference[:half])
    resumed = TokenLoader(location, **kwargs)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(take(iter(resumed), len(reference) - half), reference[half:])


def all_train_tokens(dataset: Path) -> np.ndarray:
    return np.concatenate([d for s in read_manifest(dataset).splits["train"] for d in shard_tokens(dataset, s.file)])


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> Path:
    return prepare_embedded_corpus(tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- shard assignment


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_shards_per_rank_are_disjoint_and_cover_all(dataset: Path, dp_size: int):
    names = {s.file for s in read_manifest(dataset).splits["train"]}
    for epoch in range(3):
        loaders = [TokenLoader(dataset, "train", 32, 2, r, dp_size, seed=7) for r in range(dp_size)]
        per_rank = [loader.assigned_shards(epoch) for loader in loaders]
        assert sum(len(p) for p in per_rank) == len(names)
        assert set().union(*per_rank) == names
    # The tokens a rank actually reads come from its own shards only.
    for loader in loaders:
        first = take(iter(loader), 5)
        mine = set(np.concatenate([np.concatenate(shard_tokens(dataset, f)) for f in loader.assigned_shards(0)]).tolist())
        assert set(inputs_of(first).tolist()) <= mine


def test_epochs_use_new_shard_orders(dataset: Path):
    loader = TokenLoader(dataset, "train", 32, 2, 0, 1, seed=7)
    assert loader.assigned_shards(0) != loader.assigned_shards(1)


def test_too_few_shards_for_dp_size_is_a_clear_error(dataset: Path):
    n = len(read_manifest(dataset).splits["train"])
    with pytest.raises(DatasetError, match=rf"{n} shards but dp_size is {n + 1}.*--tokens-per-shard"):
        TokenLoader(dataset, "train", 32, 2, 0, n + 1, seed=0)


def test_same_seed_same_batches_different_seed_different_order(dataset: Path):
    a = take(iter(TokenLoader(dataset, "train", 32, 4, 1, 2, seed=3)), 20)
    b = take(iter(TokenLoader(dataset, "train", 32, 4, 1, 2, seed=3)), 20)
    c = take(iter(TokenLoader(dataset, "train", 32, 4, 1, 2, seed=4)), 20)
    assert_same_batches(a, b)
    assert not np.array_equal(inputs_of(a), inputs_of(c))


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("shuffle_shards", [0, 1, 4])
def test_packing_every_token_is_an_input_once_and_labels_shift_by_one(dataset: Path, shuffle_shards: int):
    seq_len, mbs = 50, 3
    loader = TokenLoader(dataset, "train", seq_len, mbs, 0, 1, seed=11, shuffle_shards=shuffle_shards)
    lanes = [epoch_stream(loader, 0, lane) for lane in range(loader.lanes)]
    assert loader.lanes == (mbs if shuffle_shards else 1)
    rows = mbs // loader.lanes  # samples per batch from each lane
    n_batches = min(len(stream) for stream, _ in lanes) // (seq_len * rows) - 1  # stay inside epoch 0
    batches = take(iter(loader), n_batches)
    assert all(b.input_ids.shape == (mbs, seq_len) and b.input_ids.dtype == torch.long for b in batches)
    for lane, (stream, positions) in enumerate(lanes):  # row r of every batch continues lane r % lanes
        pick = lambda field: np.concatenate([getattr(b, field)[lane :: loader.lanes].reshape(-1).numpy() for b in batches])
        n = n_batches * rows * seq_len
        np.testing.assert_array_equal(pick("input_ids"), stream[:n])
        np.testing.assert_array_equal(pick("labels"), stream[1 : n + 1])
        np.testing.assert_array_equal(pick("position_ids"), positions[:n])


def test_position_ids_restart_after_eos(embedded: Path):
    eos = read_manifest(embedded).tokenizer.eos_id
    loader = TokenLoader(embedded, "train", 256, 4, 0, 2, seed=0)
    batches = take(iter(loader), 100)
    for lane in range(loader.lanes):  # row `lane` of consecutive batches is one continuous stream
        inputs = np.concatenate([b.input_ids[lane].numpy() for b in batches])
        pos = np.concatenate([b.position_ids[lane].numpy() for b in batches])
        starts = np.flatnonzero(pos == 0)
        assert len(starts) > 3
        # position 0 exactly where the previous input was EOS; otherwise positions count up by one
        np.testing.assert_array_equal(np.flatnonzero(inputs[:-1] == eos) + 1, starts[starts > 0])
        step = np.diff(pos)
        assert np.all((step == 1) | (pos[1:] == 0))


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("k,shuffle_shards", [(5, 8), (60, 8), (80, 8), (100, 8), (37, 2), (80, 2), (80, 0)])
def test_resume_is_bit_exact_same_dp_size(dataset: Path, k: int, shuffle_shards: int):
    # 60 + 20 crosses the end of epoch 0; at 80 the ranks (and the lanes of a rank) are in different epochs
    dp_size, kw = 2, dict(split="train", seq_len=64, micro_batch_size=2, seed=5, shuffle_shards=shuffle_shards)
    first = [TokenLoader(dataset, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    iters = [iter(l) for l in first]
    for it in iters:
        take(it, k)
    state = json.loads(json.dumps(TokenLoader.merge_states([l.state_dict() for l in reversed(first)])))
    assert len(json.dumps(state)) < 4096
    for r in range(dp_size):
        reference = take(iter(TokenLoader(dataset, dp_rank=r, dp_size=dp_size, **kw)), k + 20)[k:]
        resumed = TokenLoader(dataset, dp_rank=r, dp_size=dp_size, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(take(iter(resumed), 20), reference)


def test_documents_are_shuffled_across_the_shards_of_a_group(dataset: Path):
    loader = TokenLoader(dataset, "train", 64, 2, 0, 1, seed=2, shuffle_shards=4)
    shard_of = _shard_of(dataset)
    starts = [d[0] for d in epoch_documents(loader, 0)[:16]]
    first_group = set(loader.assigned_shards(0)[:4])
    assert {shard_of[int(v)] for v in starts} == first_group  # the first 16 documents span the whole group
    tokens = inputs_of(take(iter(loader), 30))
    runs = np.count_nonzero(np.diff([int(shard_of[int(v)][6:11]) for v in tokens]))
    assert runs > 8  # the packed stream switches between shards many times, not once per shard


def test_state_from_before_document_shuffling_is_refused_with_the_fix(dataset: Path):
    loader = TokenLoader(dataset, "train", 32, 2, 0, 1, seed=1)
    state = {**TokenLoader.merge_states([loader.state_dict()]), "version": 1}
    with pytest.raises(ValueError, match="start over in another run.dir, keeping its weights with checkpoint.init_from"):
        loader.load_state_dict(state)


def test_single_rank_resumes_from_its_own_state(dataset: Path):
    kw = dict(split="train", seq_len=40, micro_batch_size=3, dp_rank=0, dp_size=1, seed=1)
    loader = TokenLoader(dataset, **kw)
    it = iter(loader)
    take(it, 30)
    resumed = TokenLoader(dataset, **kw)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(take(iter(resumed), 10), take(it, 10))


def _shard_of(dataset: Path) -> dict[int, str]:
    return {int(v): s.file for s in read_manifest(dataset).splits["train"] for d in shard_tokens(dataset, s.file) for v in d}


@pytest.mark.parametrize("before_dp,after_dp", [(2, 1), (1, 2), (2, 3)])
def test_resume_with_different_dp_size_neither_repeats_nor_skips(dataset: Path, before_dp: int, after_dp: int):
    kw = dict(split="train", seq_len=64, micro_batch_size=2, seed=9)
    epoch_tokens = all_train_tokens(dataset)
    before = [TokenLoader(dataset, dp_rank=r, dp_size=before_dp, **kw) for r in range(before_dp)]
    read_before = np.concatenate([inputs_of(take(iter(l), 17 + 3 * r)) for r, l in enumerate(before)])
    state = TokenLoader.merge_states([l.state_dict() for l in before])

    shard_of = _shard_of(dataset)
    sizes = {s.file: s.tokens for s in read_manifest(dataset).splits["train"]}
    done = Counter(shard_of[int(v)] for v in read_before)
    read_after = []
    for r in range(after_dp):
        loader = TokenLoader(dataset, dp_rank=r, dp_size=after_dp, **kw)
        loader.load_state_dict(state)
        remaining = sum(sizes[f] - done[f] for f in loader.assigned_shards(0))  # rest of epoch 0 on this rank
        got = []
        for lane in range(loader.lanes):  # each lane's stream up to its first piece of epoch 1
            pieces = iter_pieces(loader.sources[0], loader.seed, r, after_dp, 0, copy.deepcopy(loader._consumed[0]),
                                 loader.shuffle_shards, lane, loader.lanes)
            got += [p.tokens for p in itertools.takewhile(lambda p: p.epoch == 0, pieces)]
        got = np.concatenate(got) if got else np.zeros(0, np.int64)
        assert len(got) == remaining
        read_after.append(got)
    union = np.concatenate([read_before, *read_after])
    assert len(union) == len(epoch_tokens) and len(np.unique(union)) == len(union)
    assert set(union.tolist()) == set(epoch_tokens.tolist())


def test_state_from_other_seed_or_dataset_is_refused(dataset: Path, tmp_path: Path):
    loader = TokenLoader(dataset, "train", 32, 2, 0, 1, seed=1)
    take(iter(loader), 3)
    with pytest.raises(ValueError, match="seed=1"):
        TokenLoader(dataset, "train", 32, 2, 0, 1, seed=2).load_state_dict(loader.state_dict())
    other = make_dataset(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="same dataset"):
        TokenLoader(other, "train", 32, 2, 0, 1, seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="one state per DP rank"):
        TokenLoader.merge_states([TokenLoader(dataset, "train", 32, 2, 1, 2, seed=1).state_dict()])


# ---------------------------------------------------------------- mixtures


def test_mixture_interleaves_by_weight_deterministically_and_resumes(tmp_path: Path):
    a = make_dataset(tmp_path / "a", first_value=1)
    b = make_dataset(tmp_path / "b", first_value=40000, seed=2)
    spec = [(a, 3.0), (b, 1.0)]
    kw = dict(split="train", seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=2, seed=3)
    batches = take(iter(TokenLoader(spec, **kw)), 100)
    rows = torch.cat([x.input_ids for x in batches])
    from_a = (rows < 40000).all(dim=1)
    from_b = (rows >= 40000).all(dim=1)
    assert bool((from_a | from_b).all())  # each sample comes whole from one source
    assert 0.68 < from_a.float().mean().item() < 0.82
    for src in (rows[from_a], rows[from_b]):  # within an epoch no source token repeats
        assert len(torch.unique(src)) == src.numel()
    assert_same_batches(take(iter(TokenLoader(spec, **kw)), 100), batches)

    loader = TokenLoader(spec, **kw)
    take(iter(loader), 60)
    other_rank = TokenLoader(spec, **{**kw, "dp_rank": 1})
    take(iter(other_rank), 60)
    resumed = TokenLoader(spec, **kw)
    resumed.load_state_dict(TokenLoader.merge_states([loader.state_dict(), other_rank.state_dict()]))
    assert_same_batches(take(iter(resumed), 40), batches[60:])


# ---------------------------------------------------------------- validation split


def test_val_split_is_deterministic_for_fresh_loaders(dataset: Path):
    a = take(iter(TokenLoader(dataset, "val", 32, 2, 0, 2, seed=0)), 5)
    b = take(iter(TokenLoader(dataset, "val", 32, 2, 0, 2, seed=0)), 5)
    assert_same_batches(a, b)
    with pytest.raises(DatasetError, match="no split 'test'"):
        TokenLoader(dataset, "test", 32, 2, 0, 1, seed=0)


# ---------------------------------------------------------------- corruption


def read_everything(loader: TokenLoader) -> None:
    it = iter(loader)
    total = sum(s.tokens for s in loader.sources[0].shards)
    for _ in range(total // (loader.seq_len * loader.micro_batch_size) + 2):
        next(it)


def test_truncated_shard_is_named_in_the_error(dataset: Path):
    shard = dataset / "train-00003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"train-00003\.tar: checksum mismatch"):
        read_everything(TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0))
    # Without a checksum to compare (shards read from URLs or named by patterns) the reader finds it too.
    with pytest.raises(DatasetError, match=r"train-00003\.tar: corrupt shard"):
        read_everything(TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0, verify_checksums=False))


def test_truncated_shard_on_member_boundary_is_detected(dataset: Path):
    shard = dataset / "train-00002.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[2].offset  # drop everything from the third document on
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DatasetError, match=r"train-00002\.tar: corrupt shard.*manifest says"):  # without checksums
        read_everything(TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0, verify_checksums=False))


def test_a_row_of_the_micro_batch_that_no_document_reaches_is_an_error_not_a_hang(dataset: Path):
    """The val split holds 6 documents and the rows of a micro-batch take turns over them: rows 6 and 7
    of 8 would read epoch after epoch without ever being dealt one."""
    with pytest.raises(DatasetError, match=r"split 'val': row 6 of a micro-batch gets no document in epoch 0: "
                                           r"the 8 rows .* hold at most 6; lower train.micro_batch_size"):
        next(iter(TokenLoader(dataset, "val", 16, 8, 0, 1, seed=0, shuffle_shards=8)))
    assert next(iter(TokenLoader(dataset, "val", 16, 6, 0, 1, seed=0, shuffle_shards=8))).input_ids.shape == (6, 16)


def test_bad_checksum_is_detected_by_default(dataset: Path):
    shard = dataset / "train-00005.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        m = tar.getmembers()[0]
    data[m.offset_data + m.size - 1] ^= 0x01  # alter one token value; the tar stays well-formed
    shard.write_bytes(bytes(data))
    # undetectable without checksums: the tar is well-formed and every count still matches the manifest
    read_everything(TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0, verify_checksums=False))
    with pytest.raises(DatasetError, match=r"train-00005\.tar: checksum mismatch"):
        read_everything(TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0))


def test_missing_shard_is_named_at_construction(dataset: Path):
    (dataset / "train-00007.tar").unlink()
    with pytest.raises(DatasetError, match=r"train-00007\.tar: shard file is missing"):
        TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0)


def test_manifest_of_unknown_version_or_garbage_is_refused(dataset: Path):
    path = dataset / "manifest.json"
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "version": 99}))
    with pytest.raises(DatasetError, match=r"manifest\.json: unknown manifest version 99"):
        read_manifest(dataset)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"manifest\.json: manifest is not valid JSON"):
        TokenLoader(dataset, "train", 64, 2, 0, 1, seed=0)
    path.unlink()
    with pytest.raises(DatasetError, match="manifest not found"):
        read_manifest(dataset)


# ---------------------------------------------------------------- tools


def _corpus(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(40):
        (root / "docs" / f"doc{i:02d}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps. " * (i + 3))
    with open(root / "docs" / "more.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"json line {i} über ✓ " * 4}) + "\n")
    return root / "docs"


def test_tools_run_as_scripts_and_build_a_loadable_dataset(tmp_path: Path):
    docs = _corpus(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # scripts must work from a checkout
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, env=env, capture_output=True, text=True)
    r = run("tools/train_tokenizer.py", "--input", str(docs), "--vocab-size", "400", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    r = run("tools/train_tokenizer.py", "--input", str(docs), "--vocab-size", "300", "--out", str(tmp_path / "small"))
    assert r.stdout.strip() == f"wrote {tmp_path / 'small' / 'tokenizer.json'} (300 tokens)", r.stderr
    r = run("tools/train_tokenizer.py", "--input", str(docs), "--vocab-size", "70000", "--out", str(tmp_path / "big"))
    size = load_tokenizer(tmp_path / "big").get_vocab_size()
    assert r.returncode == 0 and size < 70000, r.stderr  # a corpus this small runs out of pairs to merge
    assert r.stdout.strip().endswith(f"({size} tokens, fewer than --vocab-size 70000: the corpus has no more "
                                     "pairs to merge)"), r.stdout
    r = run("tools/prepare_data.py", "--input", str(docs), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "ds"), "--val-fraction", "0.2", "--tokens-per-shard", "200")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "ds")
    assert len(m.splits["train"]) >= 4 and m.tokenizer.eos_id == 0
    assert len(m.splits["val"]) >= 8  # --min-val-shards' default: up to 8 DP ranks can evaluate
    assert sum(s.documents for split in m.splits.values() for s in split) == 100
    batch = next(iter(TokenLoader(tmp_path / "ds", "train", 16, 2, 1, 2, seed=0)))
    assert batch.input_ids.shape == (2, 16)
    assert "--tokens-per-shard" in run("tools/prepare_data.py", "--help").stdout


def test_prepare_data_refuses_a_non_empty_out_dir_and_leaves_it_untouched(tmp_path: Path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import prepare_data
        import train_tokenizer
    finally:
        sys.path.remove(str(REPO / "tools"))
    docs = _corpus(tmp_path)
    assert train_tokenizer.main(["--input", str(docs), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["--input", str(docs), "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"), "--out", str(out)]
    assert prepare_data.main(argv) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dirs left behind
    assert train_tokenizer.main(["--input", str(docs), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 1


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_layout(embedded: Path):
    m = read_manifest(embedded)
    assert "vocab8192" in embedded.name and "-v1-" in embedded.name
    assert m.dtype == "uint16" and m.tokenizer.vocab_size == 8192 and m.tokenizer.eos_id == 0
    assert len(m.splits["train"]) >= 8 and len(m.splits["val"]) >= 4
    assert m.num_tokens("train") > 1_000_000
    assert prepare_embedded_corpus(embedded.parent) == embedded  # cached: second call reuses it


def test_embedded_tokenizer_round_trips_text(embedded: Path):
    tok = load_tokenizer(embedded)
    for text in ["def f(x):\n    return x ** 2  # square\n", "Ünïcödé ✓ 日本語 \t\r\n  trailing  ", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<|endoftext|>") == 0


def test_embedded_val_split_is_non_empty_and_disjoint_from_train(embedded: Path):
    m = read_manifest(embedded)
    docs = {split: {d.tobytes() for s in m.splits[split] for d in shard_tokens(embedded, s.file)} for split in ("train", "val")}
    assert len(docs["val"]) >= 5
    assert not docs["val"] & docs["train"]


def test_hf_export_loads_with_auto_tokenizer(embedded: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    save_hf_tokenizer(embedded, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "import os\nprint(os.getcwd())\n"
    assert hf(text)["input_ids"] == load_tokenizer(embedded).encode(text).ids
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0 and hf.bos_token_id == 0
    assert hf.decode(hf(text)["input_ids"]) == text


def test_embedded_corpus_is_built_once_under_concurrency(tmp_path: Path):
    code = (
        "import sys; from pretrain.data.embedded import prepare_embedded_corpus as p; "
        "print(p(sys.argv[1], vocab_size=512, max_files=30))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=HUNG)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [Path(outs[0]).name]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    read_manifest(outs[0])


def test_mixture_token_proportions_are_within_one_percent_over_a_million_tokens(tmp_path: Path):
    a = make_dataset(tmp_path / "a", num_shards=4, first_value=1)
    b = make_dataset(tmp_path / "b", num_shards=4, first_value=40000, seed=2)
    spec = [(a, 0.7), (b, 0.3)]
    kw = dict(split="train", seq_len=256, micro_batch_size=8, dp_rank=0, dp_size=1, seed=3)
    loader = TokenLoader(spec, **kw)
    it = iter(loader)
    batches = take(it, 1_000_000 // (256 * 8) + 1)  # past 10^6 tokens; the datasets repeat for many epochs
    rows = torch.cat([x.input_ids for x in batches])
    share_a = (rows < 40000).all(dim=1).float().mean().item()
    assert abs(share_a - 0.7) < 0.01
    resumed = TokenLoader(spec, **kw)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(take(iter(resumed), 30), take(it, 30))


def test_config_names_a_mixture_of_sources():
    from pretrain.config import compose

    cfg = compose(["data=prepared", "data.sources=[{path: /a, weight: 0.7}, {path: /b, weight: 0.3}]"], world_size=1)
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("/a", 0.7), ("/b", 0.3)]
