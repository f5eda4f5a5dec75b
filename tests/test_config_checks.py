"""Every ConfigError that config_lib raises, one case each: the message names the key to change.

The cases call the checks directly (nothing is compiled); ``test_bad_config_raises_before_compiling_or_writing``
in test_train.py checks, for a sample of them, that the train entry point raises before it compiles
or writes anything. The last test fails when a check is added to config_lib without a case here.
"""

import ast
import importlib.util
import os
import traceback

import pytest

from shortcut_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config():
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "experiments", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal=True")  # DiT width 32, batch 64, shortcut at 1/4


def validate(overrides, num_devices=8):
    def run():
        cfg = digits_config()
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        config_lib.validate(cfg, num_devices=num_devices)

    return run


def fits(model_name, shape, patch=2):
    def run():
        cfg = digits_config()
        cfg.model.name, cfg.model.patch_size = model_name, patch
        config_lib.check_model_fits_data(cfg, shape)

    return run


CASES = {
    "preset": (lambda: config_lib.apply_preset(digits_config(), "fast"), "preset='fast'"),
    "variant": (validate({"model.variant": "Q"}), "model.variant='Q'"),
    "level weights": (validate({"objective.level_weights": (1.0,)}), "objective.level_weights"),
    "lean ops": (validate({"model.lean_ops": ("qkv",)}), "model.lean_ops"),
    "rows per level": (validate({"train.batch_size": 16}), "self-consistency rows"),
    "objective": (validate({"objective.name": "magic"}), "objective.name='magic'"),
    "teacher weights": (
        validate(
            {
                "objective.name": "consistency_distillation",
                "objective.teacher_checkpoint": ROOT,
                "objective.teacher_weights": "best",
            }
        ),
        "objective.teacher_weights='best'",
    ),
    "teacher step": (
        validate(
            {
                "objective.name": "progressive_distillation",
                "objective.teacher_checkpoint": ROOT,
                "objective.teacher_step": -2,
                "train.steps": 70,
            }
        ),
        "objective.teacher_step=-2",
    ),
    "reflow without pairs": (validate({"objective.name": "reflow"}), "data.name='reflow_pairs'"),
    "warm start weights": (
        validate({"train.init_from": "/runs/fm", "train.init_from_weights": "best"}),
        "train.init_from_weights='best'",
    ),
    "warm start step": (
        validate({"train.init_from": "/runs/fm", "train.init_from_step": -2}),
        "train.init_from_step=-2",
    ),
    "warm start of a distillation": (
        validate(
            {
                "objective.name": "consistency_distillation",
                "objective.teacher_checkpoint": ROOT,
                "train.init_from": ROOT,
            }
        ),
        "train.init_from=.* with objective.name='consistency_distillation'",
    ),
    "warm start step without a source": (validate({"train.init_from_step": 100}), "train.init_from_step=100"),
    "method keys": (
        validate({"objective.name": "diffusion", "objective.diffusion_schedule": "sigmoid"}),
        "objective.diffusion_schedule='sigmoid'",
    ),
    "guidance scale draw": (
        validate({"objective.name": "meanflow_v", "objective.meanflow_omega_draw": "power"}),
        "objective.meanflow_omega_draw='power'",
    ),
    "guidance scale outside the trained range": (
        validate({"objective.name": "meanflow_v", "eval.cfg_scale": 1.5}),
        "eval.cfg_scale=1.5 is outside objective.meanflow_omega_range=(1.0, 1.0)",
    ),
    "guidance interval out of order": (
        validate({"eval.guidance_interval": (0.8, 0.2)}),
        "eval.guidance_interval=(0.8, 0.2) must be (start, end)",
    ),
    "guidance interval without a network that reads it": (
        validate({"objective.name": "meanflow_v", "eval.guidance_interval": (0.1, 0.7)}),
        "set objective.meanflow_interval_input=True",
    ),
    "guidance interval input on another objective": (
        validate({"objective.name": "meanflow", "objective.meanflow_interval_input": True}),
        "objective.meanflow_interval_input=True with objective.name='meanflow'",
    ),
    "model name": (validate({"model.name": "unet"}), "model.name='unet'"),
    "no dims": (validate({"model.width": 0}), "set model.variant"),
    "heads": (validate({"model.width": 36, "model.num_heads": 8}), "model.num_heads=8"),
    "width": (validate({"model.width": 6, "model.num_heads": 2}), "multiple of 4"),
    "choice": (validate({"model.attention_scale": "sqrt"}), "model.attention_scale='sqrt'"),
    "fp8 outside the DiT": (
        validate({"model.name": "mlp", "model.matmul_precision": "fp8"}),
        "model.matmul_precision='fp8' applies to the DiT's blocks only",
    ),
    "fp8 history": (validate({"model.fp8_amax_history": -1}), "model.fp8_amax_history=-1 must be an integer >= 0"),
    "fp8 history without fp8": (
        validate({"model.fp8_amax_history": 16}),
        "set model.matmul_precision='fp8' or model.fp8_amax_history=0",
    ),
    "qkv gemms": (validate({"model.qkv_gemms": 2}), "model.qkv_gemms=2 is not one of"),
    "qkv gemms outside the DiT": (
        validate({"model.name": "mlp", "model.qkv_gemms": 3}),
        "model.qkv_gemms=3 applies to the DiT's attention only",
    ),
    "qkv gemms with fp8": (
        validate({"model.qkv_gemms": 3, "model.matmul_precision": "fp8"}),
        "with model.matmul_precision='fp8' q, k and v stay one FP8 GEMM",
    ),
    "scan outside the DiT": (
        validate({"model.name": "mlp", "model.scan_blocks": True}),
        "model.scan_blocks=True applies to the DiT's blocks only",
    ),
    "remat blocks": (validate({"model.remat": "dots", "model.remat_blocks": 99}), "model.remat_blocks=99"),
    "remat blocks without remat": (validate({"model.remat_blocks": 1}), "set model.remat"),
    "teacher": (validate({"objective.teacher": "oracle"}), "objective.teacher='oracle'"),
    "assignment": (validate({"objective.level_assignment": "x"}), "objective.level_assignment"),
    "levels": (validate({"objective.num_levels": 13}), "objective.num_levels=13"),
    "fraction": (validate({"objective.sc_fraction": 1.0}), "objective.sc_fraction=1.0"),
    "flow t": (validate({"objective.flow_t": "beta"}), "objective.flow_t='beta'"),
    "ema decay": (validate({"train.ema_decays": (1.0,)}), "train.ema_decays"),
    "ema teacher without ema": (
        validate({"train.ema_decays": (), "objective.teacher": "ema"}),
        "needs at least one train.ema_decays",
    ),
    "schedule": (validate({"optim.schedule": "step"}), "optim.schedule='step'"),
    "decay mask": (validate({"optim.weight_decay_mask": "bias"}), "optim.weight_decay_mask"),
    "accumulation": (validate({"optim.accum_steps": 0}), "optim.accum_steps=0"),
    "batch": (validate({"train.batch_size": 0}), "train.batch_size=0 must be >= 1"),
    "steps": (validate({"train.steps": -1}), "train.steps=-1 must be >= 0"),
    "devices": (validate({"train.batch_size": 60}), "not divisible by the 8 devices"),
    "batch by accumulation": (validate({"optim.accum_steps": 3}), "optim.accum_steps=3"),
    "micro-batch by devices": (validate({"train.batch_size": 128, "optim.accum_steps": 32}), "micro-batch"),
    "rows over micro-batches": (
        validate({"train.batch_size": 120, "objective.sc_fraction": 0.125, "optim.accum_steps": 2}, num_devices=1),
        "split evenly",
    ),
    "intervals": (validate({"train.log_every": 0}), "train.log_every=0"),
    "profile": (validate({"train.profile_steps": (5,)}), "train.profile_steps"),
    "init on": (validate({"train.init_on": "tpu"}), "train.init_on='tpu'"),
    "evaluated ema": (validate({"eval.ema_index": 1}), "eval.ema_index=1"),
    "decode batch": (validate({"eval.decode_batch_size": 0}), "eval.decode_batch_size=0"),
    "final samples": (validate({"eval.final_num_samples": -1}), "eval.final_num_samples=-1"),
    "metric": (validate({"eval.metric": "fid9"}), "eval.metric='fid9'"),
    "cfd without classifier": (validate({"eval.metric": "cfd"}), "needs eval.classifier"),
    "budget": (validate({"eval.budgets": (3,)}), "eval budget 3"),
    "label mode": (validate({"eval.label_mode": "uniform"}), "eval.label_mode='uniform'"),
    "fid batch": (validate({"eval.fid_batch_size": 0}), "eval.fid_batch_size=0"),
    "export budgets": (validate({"eval.export_budgets": (2,)}), "eval.export_budgets=(2,) holds"),
    "export file": (
        validate({"eval.export_budgets": (1,), "eval.export_npz": "samples.png"}),
        "eval.export_npz='samples.png' must name a .npz",
    ),
    "export field": (
        validate({"eval.export_budgets": (1,), "eval.export_npz": "s_{step}.npz"}),
        "the only field it may hold is",
    ),
    "export one file": (
        validate({"eval.budgets": (1, 4), "eval.export_budgets": (1, 4), "eval.export_npz": "s.npz"}),
        "one file for 2 budgets",
    ),
    "dit on points": (fits("dit", (2,)), "model.name='mlp'"),
    "patch": (fits("dit", (9, 9, 3)), "model.patch_size=2"),
    "mlp on images": (fits("mlp", (8, 8, 3)), "model.name='dit'"),
    "argument key": (lambda: config_lib.parse_config_arg("steps=3", {"runlocal": False}), "expected key=value"),
    "argument bool": (lambda: config_lib.parse_config_arg("runlocal=yes", {"runlocal": False}), "True or False"),
}


def _raise_line(case) -> int:
    """The config_lib line that raised for one case."""
    fn, message = CASES[case]
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        fn()
    frames = [f for f in traceback.extract_tb(info.tb) if f.filename == config_lib.__file__]
    return frames[-1].lineno


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_check_names_the_key_to_change(case):
    assert _raise_line(case) > 0


def test_every_config_error_in_config_lib_has_a_case():
    source = open(config_lib.__file__, encoding="utf-8").read()
    raise_lines = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Raise)
            and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, "id", "") == "ConfigError"
        ):
            # a multi-line raise is reported by the traceback at the line of its call
            raise_lines.add(node.lineno)
    covered = {_raise_line(case) for case in CASES}
    assert raise_lines - covered == set(), "config_lib checks without a case in CASES"
