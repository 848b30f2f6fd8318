"""The ATC build of the package: `ascend/build_om.sh` with the exact `atc` command per graph, its
config files, and `run_atc` that runs it where CANN is installed.

Layout written into the package (paths relative to the package root; the script cds there):

    ascend/build_om.sh            `bash ascend/build_om.sh` builds every .om; `... check` runs only
                                  the `atc --mode=3` pre-checks
    ascend/keep_dtype/<g>.cfg     node names ATC keeps in fp32 (softmax, RMSNorm, MoE router), one
                                  per line (ATC's --keep_dtype format); only under lowering modes
    ascend/atc_config.json        soc_version, precision, every graph's inputs/shapes/gears and the
                                  exact argv of each command (machine-readable twin of the script)
    ascend/om/<g>.om              written by ATC (never by this repository)
    ascend/logs/                  ATC's output per graph, check_result.json / fusion_result.json

Each graph gets (REFERENCE.md section 3):
    atc --mode=3 --framework=5 --model=onnx/<g>.onnx --soc_version=SOC          (pre-check)
    atc --model=onnx/<g>.onnx --framework=5 --output=ascend/om/<g> --soc_version=SOC
        --input_format=ND --input_shape="name:d0,d1;..." [--dynamic_dims="g1;g2"]
        --precision_mode=...|--precision_mode_v2=... [--keep_dtype=ascend/keep_dtype/<g>.cfg]
        --external_weight=0|1 --log=error
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import onnx

from models.errors import MlamoeError

from .profile import AscendProfile

SCRIPT = "ascend/build_om.sh"
CONFIG = "ascend/atc_config.json"
OM_DIR = "ascend/om"
LOG_DIR = "ascend/logs"
KEEP_DIR = "ascend/keep_dtype"
MAX_GEARS = 100
STATUS_BUILT = "om built"
STATUS_NO_ATC = "om not built: atc not found"


class AtcError(MlamoeError):
    pass


@dataclasses.dataclass
class AtcGraph:
    """One graph's ATC view: its ONNX file (relative to the package root), ordered inputs with
    their shapes (-1 on gear axes), the gears (one tuple of values for the -1 dims per gear, in
    input order) and the nodes kept in fp32."""

    name: str
    onnx: str
    inputs: list[tuple[str, list[int]]]
    gears: list[tuple[int, ...]] | None = None
    keep_fp32: list[str] = dataclasses.field(default_factory=list)

    @property
    def input_shape(self) -> str:
        return ";".join(f"{n}:{','.join(str(d) for d in s)}" for n, s in self.inputs)

    @property
    def dynamic_dims(self) -> str | None:
        if not self.gears:
            return None
        return ";".join(",".join(str(v) for v in g) for g in self.gears)


def graph_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    """(name, shape) of a saved graph's real inputs (initializers excluded); symbolic dims as str."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for v in m.graph.input:
        if v.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
        out.append((v.name, dims))
    return out


def atc_graph(package_dir: Path, onnx_rel: str, name: str | None = None,
              gears: list[tuple[int, ...]] | None = None, keep_fp32: list[str] | None = None) -> AtcGraph:
    """Read a packaged graph's inputs and validate its gears.

    A static graph takes no gears. A graph with symbolic input dims needs gears: 2..100 of them,
    each giving one positive value per symbolic dim (in input order); anything else is an error
    naming the graph, the dims and what is wrong.
    """
    name = name or Path(onnx_rel).stem
    ins = graph_inputs(Path(package_dir) / onnx_rel)
    symbolic = [(n, i, d) for n, s in ins for i, d in enumerate(s) if not isinstance(d, int) or d <= 0]
    if not symbolic:
        if gears:
            raise AtcError(f"graph {name!r}: static inputs, but gears {gears} were given; --dynamic_dims needs "
                           "inputs with dynamic (-1) dims")
        return AtcGraph(name, onnx_rel, [(n, list(s)) for n, s in ins], None, list(keep_fp32 or []))
    where = ", ".join(f"{n}[{i}]={d}" for n, i, d in symbolic)
    if not gears:
        raise AtcError(f"graph {name!r}: inputs have dynamic dims ({where}) and no gears; ATC needs static shapes "
                       f"or 2..{MAX_GEARS} --dynamic_dims gears")
    if not (1 < len(gears) <= MAX_GEARS):
        raise AtcError(f"graph {name!r}: {len(gears)} gears; ATC's --dynamic_dims takes more than 1 and at most "
                       f"{MAX_GEARS}")
    for g in gears:
        if len(g) != len(symbolic) or not all(isinstance(v, int) and v > 0 for v in g):
            raise AtcError(f"graph {name!r}: gear {tuple(g)} cannot express the dynamic dims ({where}): each gear "
                           f"needs {len(symbolic)} positive integer(s), one per dynamic dim in input order")
    if len(set(map(tuple, gears))) != len(gears):
        raise AtcError(f"graph {name!r}: duplicate gears in {gears}")
    inputs = [(n, [d if isinstance(d, int) and d > 0 else -1 for d in s]) for n, s in ins]
    return AtcGraph(name, onnx_rel, inputs, [tuple(g) for g in gears], list(keep_fp32 or []))


def _keep_file(g: AtcGraph) -> str:
    return f"{KEEP_DIR}/{g.name}.cfg"


def atc_argv(g: AtcGraph, profile: AscendProfile, external_weight: int = 0) -> list[str]:
    """The build command for one graph, as argv."""
    if external_weight not in (0, 1, 2):
        raise AtcError(f"external_weight {external_weight}: ATC takes 0, 1 or 2")
    argv = ["atc", f"--model={g.onnx}", "--framework=5", f"--output={OM_DIR}/{g.name}",
            f"--soc_version={profile.soc_version}", "--input_format=ND", f"--input_shape={g.input_shape}"]
    if g.dynamic_dims:
        argv.append(f"--dynamic_dims={g.dynamic_dims}")
    argv.append(f"{profile.precision_flag}={profile.precision_mode}")
    if profile.uses_keep_dtype and g.keep_fp32:
        argv.append(f"--keep_dtype={_keep_file(g)}")
    argv += [f"--external_weight={external_weight}", "--log=error"]
    return argv


def precheck_argv(g: AtcGraph, profile: AscendProfile) -> list[str]:
    return ["atc", "--mode=3", "--framework=5", f"--model={g.onnx}", f"--soc_version={profile.soc_version}"]


def _q(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def render_script(graphs: list[AtcGraph], profile: AscendProfile, external_weight: int = 0) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Builds the Ascend .om files of this package with CANN's ATC (generated by mlamoe; do not edit:",
        "# ascend/atc_config.json holds the same commands). Usage, from anywhere:",
        "#   bash ascend/build_om.sh          pre-check (atc --mode=3) then build every graph",
        "#   bash ascend/build_om.sh check    pre-checks only",
        f"# soc_version {profile.soc_version}; {profile.precision_flag}={profile.precision_mode}.",
        "# Needs the CANN toolkit (source set_env.sh first) and the chip's ops package; no NPU needed.",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'MODE="${1:-build}"',
        'command -v atc >/dev/null 2>&1 || { echo "atc not found: source the CANN set_env.sh first" >&2; exit 127; }',
        f"mkdir -p {OM_DIR} {LOG_DIR}",
        "",
    ]
    for g in graphs:
        lines += [
            f"# ---- {g.name}: {g.onnx}",
            f"echo '[atc] pre-check {g.name}'",
            _q(precheck_argv(g, profile)) + f" 2>&1 | tee {LOG_DIR}/{g.name}.check.log",
            f"if [ -f check_result.json ]; then mv check_result.json {LOG_DIR}/{g.name}.check_result.json; fi",
            'if [ "$MODE" != check ]; then',
            f"  echo '[atc] build {g.name}'",
            "  " + _q(atc_argv(g, profile, external_weight)) + f" 2>&1 | tee {LOG_DIR}/{g.name}.atc.log",
            f"  if [ -f fusion_result.json ]; then mv fusion_result.json {LOG_DIR}/{g.name}.fusion_result.json; fi",
            "fi",
            "",
        ]
    lines.append("echo '[atc] done'")
    return "\n".join(lines) + "\n"


def write_build(package_dir: Path, graphs: list[AtcGraph], profile: AscendProfile, external_weight: int = 0) -> dict:
    """Write ascend/build_om.sh, the keep_dtype files and ascend/atc_config.json; return the
    manifest section describing them."""
    package_dir = Path(package_dir)
    names = [g.name for g in graphs]
    if len(set(names)) != len(names):
        raise AtcError(f"duplicate graph names {names}")
    (package_dir / "ascend").mkdir(parents=True, exist_ok=True)
    keep_files = {}
    if profile.uses_keep_dtype:
        for g in graphs:
            if g.keep_fp32:
                p = package_dir / _keep_file(g)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("\n".join(g.keep_fp32) + "\n")
                keep_files[g.name] = _keep_file(g)
    script = package_dir / SCRIPT
    script.write_text(render_script(graphs, profile, external_weight))
    script.chmod(0o755)
    config = {
        "soc_version": profile.soc_version,
        "precision": {"flag": profile.precision_flag, "mode": profile.precision_mode,
                      "keep_dtype": profile.uses_keep_dtype},
        "external_weight": external_weight,
        "graphs": [{"name": g.name, "onnx": g.onnx, "om": f"{OM_DIR}/{g.name}.om",
                    "inputs": [{"name": n, "shape": s} for n, s in g.inputs],
                    "input_shape": g.input_shape, "dynamic_dims": g.dynamic_dims,
                    "keep_dtype": keep_files.get(g.name), "n_keep_fp32": len(g.keep_fp32),
                    "precheck_argv": precheck_argv(g, profile), "atc_argv": atc_argv(g, profile, external_weight)}
                   for g in graphs],
    }
    (package_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"script": SCRIPT, "config": CONFIG, "keep_dtype": keep_files, "soc_version": profile.soc_version,
            "precision": f"{profile.precision_flag}={profile.precision_mode}"}


@dataclasses.dataclass
class AtcResult:
    status: str  # STATUS_BUILT | STATUS_NO_ATC
    om_files: list[str]
    log: str | None  # package-relative path of the combined log, when atc ran
    atc: str | None  # the atc executable used

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _error_text(log: str, limit: int = 40) -> str:
    lines = log.strip().splitlines()
    errs = [ln for ln in lines if re.search(r"\bE[0-9A-Z]{4,6}\b|ERROR|Error|error|failed|FAILED", ln)]
    picked = errs[-limit:] if errs else lines[-limit:]
    return "\n".join(picked)


def run_atc(package_dir: Path, require_om: bool = False, atc: str | None = None, timeout: float | None = None) -> AtcResult:
    """Run ascend/build_om.sh when `atc` is on PATH (or `atc` names it).

    - atc missing: returns status "om not built: atc not found" (AtcError if require_om).
    - atc present: runs the script with bash from the package root, writes its whole output to
      ascend/logs/build_om.log, moves any stray .om into ascend/om/, and checks every graph's
      .om exists. A non-zero exit or a missing .om raises AtcError with ATC's error lines.
    """
    package_dir = Path(package_dir)
    config = json.loads((package_dir / CONFIG).read_text())
    exe = shutil.which(atc or "atc")
    if exe is None:
        if require_om:
            raise AtcError(f"{STATUS_NO_ATC} on PATH, and the .om files are required (--require-om): install the "
                           "CANN toolkit and `source .../ascend-toolkit/set_env.sh`, or drop --require-om to "
                           "package the ATC-ready graphs and build_om.sh without the .om")
        return AtcResult(STATUS_NO_ATC, [], None, None)
    env = dict(os.environ)
    env["PATH"] = str(Path(exe).parent) + os.pathsep + env.get("PATH", "")
    (package_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    log_rel = f"{LOG_DIR}/build_om.log"
    try:
        proc = subprocess.run(["bash", str(package_dir / SCRIPT)], cwd=package_dir, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AtcError(f"atc ({exe}) did not finish within {timeout} s") from e
    log = proc.stdout + proc.stderr
    (package_dir / log_rel).write_text(log)
    om_dir = package_dir / OM_DIR
    om_dir.mkdir(parents=True, exist_ok=True)
    for stray in package_dir.glob("*.om"):
        shutil.move(str(stray), om_dir / stray.name)
    if proc.returncode != 0:
        raise AtcError(f"atc failed (exit {proc.returncode}; full log {log_rel}):\n{_error_text(log)}")
    missing = [g["om"] for g in config["graphs"] if not (package_dir / g["om"]).is_file()]
    if missing:
        raise AtcError(f"atc exited 0 but did not write {', '.join(missing)} (full log {log_rel}):\n"
                       f"{_error_text(log)}")
    return AtcResult(STATUS_BUILT, [g["om"] for g in config["graphs"]], log_rel, exe)


def parse_script(text: str) -> list[list[str]]:
    """The atc commands of a build_om.sh, as argv lists (for tests and `mlamoe inspect`)."""
    cmds = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("atc "):
            argv = shlex.split(s.split(" 2>&1")[0])
            cmds.append(argv)
    return cmds
