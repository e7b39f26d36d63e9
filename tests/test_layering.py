"""grok1's layers import downward only, and heavy or optional dependencies stay in their layer
(STYLE.md section 7)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grok1"

LEVELS = {
    "config": 0, "quant": 0, "tokenizer": 0, "chat": 0,
    "sharding": 0.5,  # pure data on the config: what each rank holds
    "moe_dispatch": 0.5,  # the MoE's pairs grouped by expert, grouped matmuls (torch only)
    # Grok-2's config and tokenizer build on config.py's / tokenizer.py's errors (to be folded in)
    "config_grok2": 0.5, "tokenizer_grok2": 0.5,
    "model": 1, "sampling": 1,
    "lora": 1.5,  # LoRA as a module swap over model.py's Linears
    "ops": 2, "checkpoint": 2, "info": 2, "generation": 2, "assets": 2, "golden": 2,
    "parallel": 3,
    "loading": 4,  # grok1.load / random_weights: formats (checkpoint) + sharding (parallel)
    "engine": 5, "train": 5,
    "server": 6, "eval": 6,
    "cli": 7, "__main__": 8, "__init__": 8,
}
# third-party modules allowed only below these grok1 packages
CONFINED = {"triton": {"ops"}, "torch.distributed": {"parallel", "train"},
            "fastapi": {"server"}, "uvicorn": {"server"}, "lm_eval": {"eval"}}


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_module_has_a_level():
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")}
    assert units <= set(LEVELS), f"add a level for {sorted(units - set(LEVELS))}"


def test_imports_point_downward_and_dependencies_stay_in_their_layer():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(path)
        for name in imports(path):
            if name.startswith("grok1."):
                target = name.split(".")[1]
                if target in LEVELS and target != unit and LEVELS[target] >= LEVELS[unit]:
                    problems.append(f"{path.relative_to(PACKAGE)} imports {name} (level "
                                    f"{LEVELS[target]} >= {LEVELS[unit]})")
            for dep, allowed in CONFINED.items():
                if (name == dep or name.startswith(dep + ".")) and unit not in allowed:
                    problems.append(f"{path.relative_to(PACKAGE)} imports {name}; only "
                                    f"{sorted(allowed)} may")
    assert not problems, "\n".join(problems)
