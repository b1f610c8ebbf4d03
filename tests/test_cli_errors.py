"""Bad input on the command line: exit code 2, one line on stderr, no output files (CLI.md).

Each row is a command line (``{tmp}`` is the test's directory, also the working directory, so
default output directories would land there too), an optional setup that makes the bad input
(a damaged checkpoint, a file where a directory is wanted) and a phrase the one error line must
contain. Every row must fail before any expensive work: the whole table runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfree_fpga.cli import main
from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT

REPO = Path(__file__).resolve().parent.parent


# -- setups: each makes something under tmp and returns nothing --------------------------------------
def _checkpoint(tmp: Path) -> Path:
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEMO_CHECKPOINT / name, ckpt / name)
    return ckpt


def config(**changes):
    """A copy of the demo checkpoint whose config.json has ``changes`` (None deletes a key)."""
    def setup(tmp):
        path = _checkpoint(tmp) / "config.json"
        cfg = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value
        path.write_text(json.dumps(cfg))
    return setup


def config_text(data: bytes):
    def setup(tmp):
        (_checkpoint(tmp) / "config.json").write_bytes(data)
    return setup


def safetensors_bytes(make):
    """The demo checkpoint with model.safetensors replaced by ``make(original bytes)``."""
    def setup(tmp):
        path = _checkpoint(tmp) / "model.safetensors"
        path.write_bytes(make(path.read_bytes()))
    return setup


def tensors(edit):
    def setup(tmp):
        path = _checkpoint(tmp) / "model.safetensors"
        t = load_file(str(path))
        edit(t)
        save_file(t, str(path))
    return setup


def pytorch_bin(make):
    """The demo checkpoint as pytorch_model.bin, whose bytes are ``make(bytes torch.save wrote)``."""
    def setup(tmp):
        ckpt = _checkpoint(tmp)
        st = ckpt / "model.safetensors"
        torch.save(load_file(str(st)), ckpt / "pytorch_model.bin")
        st.unlink()
        path = ckpt / "pytorch_model.bin"
        path.write_bytes(make(path.read_bytes()))
    return setup


def torch_saved(obj_fn):
    def setup(tmp):
        ckpt = _checkpoint(tmp)
        (ckpt / "model.safetensors").unlink()
        torch.save(obj_fn(), ckpt / "pytorch_model.bin")
    return setup


def a_file(name: str):
    def setup(tmp):
        (tmp / name).write_text("precious\n")
    return setup


def a_dir(name: str, with_file: bool = False):
    def setup(tmp):
        (tmp / name).mkdir()
        if with_file:
            (tmp / name / "notes.txt").write_text("precious\n")
    return setup


def a_fifo(name: str):
    """A named pipe: not a file --json-out may replace (as /dev/null is not; a pipe is safe to test)."""
    def setup(tmp):
        os.mkfifo(tmp / name)
    return setup


RANDOM = bytes((i * 197 + 89) % 256 for i in range(4096))   # not a pickle, zip or safetensors header
CKPT = ["--checkpoint", "{tmp}/ckpt"]
REF = ["reference", "--steps", "1"]

# id: (argv, setup or None, phrase in the error line)
CASES = {
    # the command line itself
    "no_command": ([], None, "required: COMMAND"),
    "unknown_command": (["frobnicate"], None, "invalid choice"),
    "unknown_option": (["reference", "--bogus"], None, "unrecognized arguments: --bogus"),
    "temperature_nan": (REF + ["--temperature", "nan"], None, "--temperature must be >= 0"),
    "temperature_inf": (REF + ["--temperature", "inf"], None, "--temperature must be >= 0"),
    "temperature_negative": (REF + ["--temperature", "-0.5"], None, "--temperature must be >= 0"),
    "top_k_negative": (REF + ["--top-k", "-1"], None, "--top-k must be >= 0"),
    "steps_negative": (["reference", "--steps", "-1"], None, "--steps must be >= 0"),
    "steps_fraction": (["reference", "--steps", "1.5"], None, "--steps must be >= 0 (an integer)"),
    "seed_negative": (REF + ["--seed", "-1"], None, "--seed must be >= 0"),
    "prompt_not_utf8": (REF + ["--prompt", "a\udcff"], None, "--prompt-ids 97,255"),
    "prompt_not_unicode": (REF + ["--prompt", "a\ud800"], None, "--prompt is not valid Unicode"),
    "prompt_empty": (REF + ["--prompt", ""], None, "the prompt is empty"),
    "prompt_and_ids": (REF + ["--prompt", "a", "--prompt-ids", "1"], None, "either --prompt or --prompt-ids"),
    "prompt_ids_garbage": (REF + ["--prompt-ids", "1,x"], None, "comma-separated integers"),
    "prompt_ids_vocab": (REF + ["--prompt-ids", "1,256"], None, "outside the vocabulary"),
    "sim_temperature_nan": (["sim", "--temperature", "nan"], None, "--temperature must be >= 0"),
    "run_top_k_negative": (["run", "--device", "loop://", "--top-k", "-1"], None, "--top-k must be >= 0"),
    "compare_lanes_zero": (["compare", "--lanes", "0"], None, "--lanes must be one of"),
    "compare_lanes_negative": (["compare", "--lanes", "-1"], None, "--lanes must be one of"),
    "compare_lanes_unsupported": (["compare", "--lanes", "24"], None, "--lanes must be one of"),
    "compare_positions_zero": (["compare", "--positions", "0"], None, "--positions must be >= 1"),
    "compare_positions_and_prompt": (["compare", "--hardware", "none", "--positions", "5", "--prompt", "ab"],
                                     None, "--positions counts held-out text"),
    "compare_image_without_hardware": (["compare", "--hardware", "none", "--image", "{tmp}"], None,
                                       "--image is for the hardware side"),
    "generate_lanes_zero": (["generate", "--lanes", "0"], None, "--lanes must be one of"),
    "demo_lanes": (["demo", "--lanes", "12"], None, "--lanes must be one of"),
    "demo_temperature_nan": (["demo", "--temperature", "nan"], None, "--temperature must be >= 0"),
    "demo_prompt_not_utf8": (["demo", "--prompt", "\udcff"], None, "not valid UTF-8"),
    "train_steps_zero": (["train", "--steps", "0"], None, "--steps must be >= 1"),
    "train_batch_zero": (["train", "--batch", "0"], None, "--batch must be >= 1"),
    "train_seq_zero": (["train", "--seq", "0"], None, "--seq must be >= 1"),
    "train_lr_nan": (["train", "--lr", "nan"], None, "--lr must be > 0"),
    "train_hidden_size_zero": (["train", "--hidden-size", "0"], None, "--hidden-size must be >= 1"),
    "train_seed_negative": (["train", "--seed", "-2"], None, "--seed must be in [0, 18446744073709551615]"),
    "train_seed_huge": (["train", "--seed", str(2 ** 64)], None, "--seed must be in [0, 18446744073709551615]"),
    "train_device": (["train", "--device", "nonsense", "--out", "{tmp}/t"], None, "--device 'nonsense'"),
    "train_seq_too_long": (["train", "--seq", "100000000", "--out", "{tmp}/t"], None, "--seq 100000000 is longer"),
    "build_board": (["build", "--board", "nope"], None, "unknown board 'nope'"),
    "program_board": (["program", "--board", "nope"], None, "unknown board 'nope'"),
    "build_clock_nan": (["build", "--clock-mhz", "nan"], None, "--clock-mhz must be > 0"),
    "build_baud_zero": (["build", "--baud", "0"], None, "--baud must be >= 1"),
    "sim_lanes_zero": (["sim", "--lanes", "0"], None, "--lanes must be one of"),
    "sim_mem_bandwidth_nan": (["sim", "--mem-bandwidth", "nan"], None, "--mem-bandwidth must be in [0, 255]"),
    "sim_mem_latency_zero": (["sim", "--mem-latency", "0"], None, "--mem-latency must be in [1, 60]"),
    "sim_stall_rate_one": (["sim", "--stall-rate", "1"], None, "--stall-rate must be in [0, 1)"),
    "serve_lanes_zero": (["serve", "--backend", "model", "--lanes", "0"], None, "--lanes must be one of"),
    "serve_port_out_of_range": (["serve", "--port", "70000"], None, "--port must be in [0, 65535]"),
    "run_baud_zero": (["run", "--device", "loop://", "--baud", "0"], None, "--baud must be >= 1"),
    "run_timeout_nan": (["run", "--device", "loop://", "--timeout", "nan"], None, "--timeout must be > 0"),
    "run_timeout_zero": (["run", "--device", "loop://", "--timeout", "0"], None, "--timeout must be > 0"),
    "run_port_out_of_range": (["run", "--device", "socket://127.0.0.1:99999"], None, "port 99999 is out of range"),
    "run_port_missing": (["run", "--device", "socket://127.0.0.1"], None, "names no port"),
    "run_port_not_number": (["run", "--device", "socket://127.0.0.1:http"], None, "port http is not a number"),
    "bench_unknown_section": (["bench", "--only", "nope"], None, "unknown bench section"),

    # output paths that cannot be written: refused before the work
    "export_out_file": (["export", "--out", "{tmp}/x"], a_file("x"), "is an existing file"),
    "generate_out_file": (["generate", "--out", "{tmp}/x"], a_file("x"), "is an existing file"),
    "compare_out_file": (["compare", "--hardware", "none", "--out", "{tmp}/x"], a_file("x"), "is an existing file"),
    "train_out_file": (["train", "--out", "{tmp}/x"], a_file("x"), "is an existing file"),
    "train_out_not_checkpoint": (["train", "--out", "{tmp}/d"], a_dir("d", with_file=True), "is not a checkpoint"),
    "build_out_file": (["build", "--out", "{tmp}/x"], a_file("x"), "is an existing file"),
    "export_out_under_file": (["export", "--out", "{tmp}/x/y"], a_file("x"), "is a file, not a directory"),
    "bench_out_dir": (["bench", "--out", "{tmp}/d"], a_dir("d"), "--out {tmp}/d is a directory"),
    "json_out_dir": (REF + ["--json-out", "{tmp}/d"], a_dir("d"), "--json-out {tmp}/d is a directory"),
    "json_out_under_file": (REF + ["--json-out", "{tmp}/x/r.json"], a_file("x"), "is a file, not a directory"),
    "json_out_fifo": (REF + ["--json-out", "{tmp}/fifo"], a_fifo("fifo"), "not a regular file"),
    "export_json_out_dir": (["export", "--out", "{tmp}/e", "--json-out", "{tmp}/d"], a_dir("d"), "is a directory"),

    # checkpoints
    "checkpoint_missing": (REF + ["--checkpoint", "{tmp}/nope"], None, "does not exist"),
    "checkpoint_is_file": (REF + ["--checkpoint", "{tmp}/x"], a_file("x"), "is a file"),
    "hidden_size_string": (REF + CKPT, config(hidden_size="128"), "'hidden_size' must be a positive integer"),
    "hidden_size_string_derived": (REF + CKPT, config(hidden_size="128", intermediate_size=None),
                                   "'hidden_size' must be a positive integer"),
    "hidden_ratio_string": (REF + CKPT, config(hidden_ratio="4", intermediate_size=None),
                            "'hidden_ratio' must be a positive number"),
    "hidden_ratio_zero": (REF + CKPT, config(hidden_ratio=0, intermediate_size=None),
                          "'hidden_ratio' must be a positive number"),
    "use_lower_bound_string": (REF + CKPT, config(use_lower_bound="false"), "'use_lower_bound' must be true or false"),
    "vocab_size_bool": (REF + CKPT, config(vocab_size=True), "'vocab_size' must be a positive integer"),
    "layers_float": (REF + CKPT, config(num_hidden_layers=2.0), "'num_hidden_layers' must be a positive integer"),
    "layers_huge": (REF + CKPT, config(num_hidden_layers=10 ** 9), "holds only"),
    "rms_norm_eps_string": (REF + CKPT, config(rms_norm_eps="1e-6"), "'rms_norm_eps' must be a number"),
    "short_conv_string": (REF + CKPT, config(use_short_conv="false"), "must be the JSON boolean false"),
    "num_heads_bool": (REF + CKPT, config(num_heads=True), "must be the JSON integer 1"),
    "config_list": (REF + CKPT, config_text(b"[1, 2]"), "must hold a JSON object"),
    "config_not_utf8": (REF + CKPT, config_text(b"\xff\xfe{}"), "not valid JSON"),
    "config_nan_eps": (REF + CKPT, config_text(b'{"model_type": "hgrn_bit", "vocab_size": 256, "hidden_size": 128, '
                                               b'"num_hidden_layers": 2, "rms_norm_eps": NaN}'), "'rms_norm_eps'"),
    "pytorch_random": (REF + CKPT, pytorch_bin(lambda b: RANDOM), "is not a valid checkpoint"),
    "pytorch_truncated": (REF + CKPT, pytorch_bin(lambda b: b[:len(b) // 2]), "damaged or truncated"),
    "pytorch_empty": (REF + CKPT, pytorch_bin(lambda b: b""), "is not a valid checkpoint"),
    "pytorch_module": (REF + CKPT, torch_saved(lambda: torch.nn.Linear(2, 2)), "is not a valid checkpoint"),
    "pytorch_list": (REF + CKPT, torch_saved(lambda: [torch.zeros(2)]), "does not hold a dict of tensors"),
    "safetensors_random": (REF + CKPT, safetensors_bytes(lambda b: RANDOM), "not a readable safetensors file"),
    "safetensors_truncated": (REF + CKPT, safetensors_bytes(lambda b: b[:len(b) // 2]),
                              "not a readable safetensors file"),
    "safetensors_empty": (REF + CKPT, safetensors_bytes(lambda b: b""), "not a readable safetensors file"),
    "missing_tensor": (["export", "--out", "{tmp}/e"] + CKPT, tensors(lambda t: t.pop("lm_head.weight")),
                       "lacks tensor(s) lm_head.weight"),
    "wrong_shape": (["export"] + CKPT, tensors(lambda t: t.update({"model.norm.weight": torch.ones(7)})),
                    "model.norm.weight has shape (7,)"),
    "nan_tensor": (["generate"] + CKPT, tensors(lambda t: t["model.norm.weight"].__setitem__(0, float("nan"))),
                   "contains NaN or Inf"),
}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    argv, setup, phrase = CASES[case]
    monkeypatch.chdir(tmp_path)
    if setup:
        setup(tmp_path)
    before = _files(tmp_path)
    capsys.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and len(err.splitlines()) == 1, err
    assert lines[0].startswith("mmfree-fpga"), err
    assert phrase.replace("{tmp}", str(tmp_path)) in lines[0], err
    assert "weights_only" not in err and "Traceback" not in err
    assert out == ""                                    # nothing printed before the check failed
    assert _files(tmp_path) == before                   # and nothing written


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a directory no one can write)")
def test_json_out_unwritable(tmp_path, capsys):
    assert main(REF + ["--json-out", "/proc/mmfree-fpga-test/r.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "cannot create files in /proc" in err


def test_train_keeps_existing_checkpoint_check_order(tmp_path, capsys):
    """A directory holding a checkpoint may be replaced, so it passes the --out check; a bad
    option after it still fails first and leaves the checkpoint untouched."""
    ckpt = _checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["train", "--out", str(ckpt), "--device", "nonsense"]) == 2
    assert "--device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_broken_pipe_exits_quietly(tmp_path):
    """``mmfree-fpga reference | head -c 10``: exit status 141 (SIGPIPE's), nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "mmfree_fpga.cli", "reference", "--steps", "100000",
                             "--json-out", str(tmp_path / "r.json")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert err == ""
    assert not (tmp_path / "r.json").exists()
