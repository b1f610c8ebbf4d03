"""`mmfree-fpga reference` as in CLI.md."""

import json

import numpy as np
import pytest

from mmfree_fpga.cli import main


@pytest.mark.parametrize("integer", [False, True])
def test_reference_json(tmp_path, small_checkpoint, integer, capsys):
    out = tmp_path / "r.json"
    args = ["reference", "--checkpoint", str(small_checkpoint), "--prompt", "ab", "--steps", "5",
            "--json-out", str(out)] + (["--integer"] if integer else [])
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["tokens"][:2] == [97, 98] and len(r["tokens"]) == 7
    assert len(r["logits"]) == 2 + 5 - 1 and len(r["logits"][0]) == 256
    # greedy: every generated token is the argmax of the row before it
    for t in range(1, 6):
        assert r["tokens"][t + 1] == int(np.argmax(r["logits"][t]))
    assert r["text"] == bytes(r["tokens"]).decode("utf-8", errors="replace")
    assert r["text"].startswith("ab") and capsys.readouterr().out.startswith("ab")


def test_prompt_ids_and_sampling_reproducible(tmp_path, small_checkpoint):
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}.json"
        assert main(["reference", "--checkpoint", str(small_checkpoint), "--prompt-ids", "1,2,3",
                     "--steps", "8", "--temperature", "1.5", "--top-k", "20", "--seed", "9",
                     "--json-out", str(out)]) == 0
        runs.append(json.loads(out.read_text())["tokens"])
    assert runs[0] == runs[1] and runs[0][:3] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--prompt", "a", "--prompt-ids", "1"], "either --prompt or --prompt-ids"),
    (["--steps", "-1"], "--steps must be >= 0"),
])
def test_bad_arguments(small_checkpoint, capsys, args, message):
    assert main(["reference", "--checkpoint", str(small_checkpoint)] + args) == 2
    assert message in capsys.readouterr().err


def test_reference_integer_formats(tmp_path, small_checkpoint, capsys):
    """--formats picks the integer model's number formats; the JSON names them."""
    from mmfree_fpga.config import FORMAT_SETS
    from mmfree_fpga.reference.checkpoint import load_checkpoint
    from mmfree_fpga.reference.export import integer_weights
    from mmfree_fpga.reference.integer import IntegerModel
    out = tmp_path / "r.json"
    assert main(["reference", "--checkpoint", str(small_checkpoint), "--prompt", "ab", "--steps", "3",
                 "--integer", "--formats", "wide", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "integer" and r["formats"] == "wide"
    cfg, tensors = load_checkpoint(small_checkpoint)
    m = IntegerModel(integer_weights(cfg, tensors, FORMAT_SETS["wide"]))
    want = [m.logits_to_float(m.step(t)) for t in r["tokens"][:-1]]
    np.testing.assert_array_equal(np.array(r["logits"]), np.array(want))
    capsys.readouterr()
    assert main(["reference", "--checkpoint", str(small_checkpoint), "--formats", "wide"]) == 2
    assert "add --integer" in capsys.readouterr().err


def test_formats_help_follows_the_format_sets(capsys):
    """Every --formats help describes each set from its fields (Formats.summary), so a changed set
    cannot leave a stale description behind (export's and sim's once described an older wide set)."""
    import dataclasses

    from mmfree_fpga.config import FORMAT_SETS
    wide = FORMAT_SETS["wide"]
    assert wide.summary().startswith(f"Q{wide.x_frac} in {wide.x_bits} bits, {wide.norm_bits}-bit norms")
    other = dataclasses.replace(wide, x_bits=44, x_frac=28, quant_exact=False, norm_eps=False)
    assert other.summary().startswith("Q28 in 44 bits") and "reciprocal" in other.summary()
    assert "eps" not in other.summary()
    for command in ("export", "sim", "build"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for fmt in FORMAT_SETS.values():
            assert " ".join(fmt.summary().split()) in text, command
