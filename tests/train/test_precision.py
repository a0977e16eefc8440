"""--precision: auto by capability (faked here), fixed at a cell's first start, kept by resumes, recorded."""

import json

import pytest
import torch

from histokt.errors import UserError
from histokt.train import checkpoint, precision
from histokt.train.launch import train
from histokt.train.loop import Trainer
from tests.fixtures.trainstore import make_store
from tests.train.test_loop import cfg

H100 = {"type": "cuda", "bf16": True, "fp16": True}
V100 = {"type": "cuda", "bf16": False, "fp16": True}
P100 = {"type": "cuda", "bf16": False, "fp16": False}
CPU = {"type": "cpu", "bf16": True, "fp16": True}


@pytest.mark.parametrize(
    "cap, want", [(H100, "bf16"), (V100, "fp16"), (P100, "fp32"), (CPU, "fp32")], ids=["H100", "V100", "P100", "cpu"]
)
def test_auto_is_bf16_else_fp16_else_fp32_and_the_cpu_trains_in_fp32(cap, want):
    assert precision.choose("auto", cap) == want


def test_an_explicit_precision_is_kept_or_refused_in_one_line():
    assert precision.choose("fp16", V100) == "fp16" and precision.choose("fp32", H100) == "fp32"
    assert precision.choose("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="--precision bf16: this cuda device cannot run it"):
        precision.choose("bf16", V100)
    with pytest.raises(UserError, match="--precision 'fp8': choose one of auto"):
        precision.choose("fp8", H100)
    bf16 = {"precision": "bf16", "compile": False, "warp": "device"}
    assert "RUN: the cell started in bf16 and this cuda device cannot run bf16" in precision.cannot_run(
        bf16, V100, "RUN"
    )
    assert precision.cannot_run({**bf16, "precision": "fp16"}, H100, "RUN") is None
    assert precision.cannot_run({**bf16, "precision": "fp32"}, P100, "RUN") is None


def test_the_fp16_loss_scaler_round_trips_through_a_weights_only_checkpoint(tmp_path):
    scaler = precision.grad_scaler("fp16", torch.device("cpu"))
    assert scaler.is_enabled() and not precision.grad_scaler("bf16", torch.device("cpu")).is_enabled()
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scaler.update(new_scale=1024.0)
    checkpoint.save(tmp_path, {"scaler": scaler.state_dict()})
    again = precision.grad_scaler("fp16", torch.device("cpu"))
    again.load_state_dict(checkpoint.load(tmp_path / checkpoint.LAST)["scaler"])
    assert again.get_scale() == 1024.0


def test_a_resume_keeps_the_first_starts_settings_on_another_device_and_result_json_records_them(tmp_path):
    store = make_store(tmp_path / "store")
    out = tmp_path / "run"

    class Requeued(BaseException):
        pass

    step = Trainer.step

    def stop_at_step_3(self, *batch):
        if self.state["step"] == 3:
            raise Requeued
        return step(self, *batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "step", stop_at_step_3)
        with pytest.raises(Requeued):
            train(cfg(store, out, epochs=1, ckpt_every_steps=1))  # the CPU: auto is fp32
    assert checkpoint.load(out / checkpoint.LAST)["settings"]["precision"] == "fp32"
    with pytest.MonkeyPatch.context() as mp:
        chosen = []
        mp.setattr(precision, "capability", lambda device: H100)  # requeued onto a bf16 GPU
        mp.setattr(precision, "choose", lambda *a: chosen.append(a) or "bf16")
        train(cfg(store, out, epochs=1, ckpt_every_steps=1))
    assert chosen == []  # resumed with the stored settings, not chosen again
    result = json.loads((out / "result.json").read_text())
    assert result["settings"] == {"precision": "fp32", "compile": False, "warp": "loader"}
    assert result["config"]["precision"] == "auto"


@pytest.mark.parametrize("chosen, tf32", [("fp32", False), ("bf16", True), ("fp16", True)])
def test_fp32_turns_tf32_off_and_the_lower_precisions_keep_it(chosen, tf32):
    """The paper trained in true fp32 (V100): on Ampere and later, cuDNN would run fp32 convolutions in TF32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
        precision.allow_tf32(chosen)
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
