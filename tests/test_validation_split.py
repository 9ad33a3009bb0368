"""`cpt prepare --validation-fraction F`: a deterministic split by document (a hash of its text) into
OUT/train and OUT/validation, two ordinary prepared folders that partition the input documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpt.cli import main
from cpt.data.prepare import in_validation, prepare_split
from cpt.data.source import TokenSource, validate_source
from cpt.data.tokenizer import load_tokenizer
from cpt.errors import CptError

SEQ = 16
F = 0.2


@pytest.fixture(scope="module")
def inputs(corpora, tmp_path_factory) -> tuple[list[Path], list[str]]:
    """~300 English documents (one duplicated, far from the first) and a .txt: inputs and their texts in order."""
    root = tmp_path_factory.mktemp("split-inputs")
    lines = corpora["en"]["train"].read_text(encoding="utf-8").splitlines()[:300]
    lines.append(lines[5])  # an exact duplicate: must land on the same side as the first
    (root / "en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    note = "A plain text file is one document.\n" * 40
    (root / "note.txt").write_text(note, encoding="utf-8")
    texts = [json.loads(line)["text"] for line in lines] + [note]
    return [root / "en.jsonl", root / "note.txt"], texts


def flat_ids(path: Path) -> np.ndarray:
    src = TokenSource(path)
    m = src.manifest
    return np.concatenate([np.fromfile(path / s["file"], dtype=src.dtype) for s in m["shards"]])


def expected_ids(tokenizer_dir, texts: list[str], eos: int) -> np.ndarray:
    tok = load_tokenizer(tokenizer_dir)
    out = []
    for t in texts:
        out.extend(tok.backend_tokenizer.encode(t, add_special_tokens=False).ids)
        out.append(eos)
    return np.array(out)


@pytest.fixture(scope="module")
def split(inputs, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "out"
    prepare_split(inputs[0], tokenizer_dir, out, SEQ, F, progress=False)
    return out


def test_sides_partition_the_documents(inputs, split, tokenizer_dir):
    texts = inputs[1]
    val = [t for t in texts if in_validation(t, F)]
    train = [t for t in texts if not in_validation(t, F)]
    assert len(val) + len(train) == len(texts)
    assert abs(len(val) / len(texts) - F) < 0.03  # 302 documents (binomial sd ~2.3 points): 0.19 here
    assert in_validation(texts[5], F) == in_validation(texts[-2], F)  # the duplicate shares its side
    for side, docs in (("train", train), ("validation", val)):
        src = validate_source(side, split / side, SEQ, None)
        m = src.manifest
        assert m["documents"] == len(docs)
        assert m["split"]["side"] == side and m["split"]["validation_fraction"] == F and m["split"]["seed"] == 0
        assert m["split"]["documents"] == {"train": len(train), "validation": len(val)}
        assert sum(i["documents"] for i in m["inputs"]) == len(docs)
        # the side's token stream is exactly its documents, in input order, each ended by EOS
        want = expected_ids(tokenizer_dir, docs, m["eos_token_id"])
        got = flat_ids(split / side)
        assert m["document_prefix"] == [] and len(want) == len(got) + m["tokens_dropped_tail"]
        assert np.array_equal(got, want[:len(got)])


def test_assignment_is_stable(inputs, split, tokenizer_dir, tmp_path):
    """Again with num_proc 2 and the inputs in reverse order: the same documents on each side."""
    prepare_split(inputs[0][::-1], tokenizer_dir, tmp_path / "again", SEQ, F, num_proc=2, progress=False)
    for side in ("train", "validation"):
        a, b = (json.loads((root / side / "manifest.json").read_text()) for root in (split, tmp_path / "again"))
        assert a["split"]["documents"] == b["split"]["documents"]
        assert a["documents"] == b["documents"]
        count = {i["path"]: i["documents"] for i in a["inputs"]}
        assert count == {i["path"]: i["documents"] for i in b["inputs"]}
    # same order of inputs, num_proc 2: identical token streams
    prepare_split(inputs[0], tokenizer_dir, tmp_path / "proc", SEQ, F, num_proc=2, progress=False)
    for side in ("train", "validation"):
        assert np.array_equal(flat_ids(split / side), flat_ids(tmp_path / "proc" / side))
    # another seed: another assignment
    assert [in_validation(t, F, 1) for t in inputs[1]] != [in_validation(t, F) for t in inputs[1]]


@pytest.mark.parametrize("bad", ["0", "0.5", "-0.1", "nan", "1"])
def test_bad_fraction_is_one_line(inputs, tokenizer_dir, tmp_path, capsys, bad):
    argv = ["prepare", str(inputs[0][0]), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"),
            "--seq-len", str(SEQ), "--validation-fraction", bad]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "0 < F < 0.5" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_split_parts_and_refusals(inputs, tokenizer_dir, tmp_path, capsys):
    common = ["--tokenizer", str(tokenizer_dir), "--seq-len", str(SEQ), "--validation-fraction", "0.25"]
    assert main(["prepare", *map(str, inputs[0]), *common, "--out", str(tmp_path / "o"), "--split-seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "o/train:" in out and "o/validation:" in out
    assert json.loads((tmp_path / "o" / "validation" / "manifest.json").read_text())["split"]["seed"] == 3
    # with --num-shards each part writes both sides (tests/test_prepare_inputs.py merges them)
    assert main(["prepare", *map(str, inputs[0]), *common, "--out", str(tmp_path / "p"),
                 "--num-shards", "2", "--shard-index", "0"]) == 0
    assert "tail tokens kept for the merge" in capsys.readouterr().out
    for side in ("train", "validation"):
        m = json.loads((tmp_path / "p" / side / "manifest.json").read_text())
        assert m["part"]["index"] == 0 and m["split"]["side"] == side
    with pytest.raises(CptError, match="split seed"):
        prepare_split(inputs[0], tokenizer_dir, tmp_path / "q", SEQ, 0.1, split_seed=-1)
