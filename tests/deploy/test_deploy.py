"""Deployment files, checked as far as this machine allows: Kubernetes manifests against the
API schemas (kubernetes-validate), Compose and Grafana structure, the Dockerfile's rules,
the systemd unit with ``systemd-analyze verify``. No Docker engine or cluster here:
``docker build`` and ``kubectl apply`` are not run."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # oldest with the native preStop sleep action we use


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.stem)}"] = doc
    return docs


@pytest.mark.parametrize("name", sorted(k for k in k8s_docs() if not k.startswith("Kustom")))
def test_manifest_matches_the_api_schema(name: str) -> None:
    kubernetes_validate.validate(k8s_docs()[name], K8S_VERSION, strict=True)


def test_schema_check_catches_a_typo() -> None:
    bad = copy.deepcopy(k8s_docs()["Deployment/pipeswitch"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert "secret.example.yaml" not in kust["resources"], "real keys are created, not applied"


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["Deployment/pipeswitch"]["spec"]["template"]["spec"]["containers"][0]


def test_deployment_drains_within_the_grace_period() -> None:
    docs = k8s_docs()
    pod = docs["Deployment/pipeswitch"]["spec"]["template"]["spec"]
    c = _container(docs)
    drain = float(docs["ConfigMap/pipeswitch-config"]["data"]["PIPESWITCH_DRAIN_TIMEOUT_SECS"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # preStop, then SIGTERM: drain, goodbye and exit within timeout + 2 s (issue 7).
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 2
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["failureThreshold"] == 1  # a full pod leaves the Service fast


def test_deployment_is_locked_down_and_keys_come_from_a_secret() -> None:
    docs = k8s_docs()
    pod = docs["Deployment/pipeswitch"]["spec"]["template"]["spec"]
    c = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/var/cache/pipeswitch"} <= mounts
    assert {"secretRef": {"name": "pipeswitch-keys"}} in c["envFrom"]
    for env in c.get("env", []):
        assert "KEY" not in env["name"] and "PASSWORD" not in env["name"], env
    secret = docs["Secret/pipeswitch-keys"]
    assert all(v == "" for v in secret["stringData"].values()), "no real key in the repo"


def test_hpa_scales_on_cpu_and_active_calls() -> None:
    docs = k8s_docs()
    hpa = docs["HorizontalPodAutoscaler/pipeswitch"]["spec"]
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "pipeswitch_calls_active"
    max_calls = int(docs["ConfigMap/pipeswitch-config"]["data"]["PIPESWITCH_MAX_CALLS"])
    assert int(kinds["Pods"]["pods"]["target"]["averageValue"]) < max_calls
    pdb = docs["PodDisruptionBudget/pipeswitch"]["spec"]
    sel = docs["Deployment/pipeswitch"]["spec"]["selector"]["matchLabels"]
    assert pdb["selector"]["matchLabels"] == sel
    assert docs["Service/pipeswitch"]["spec"]["selector"] == sel


def test_compose_has_the_stack() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pipeswitch", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    ps = services["pipeswitch"]
    assert ps["read_only"] is True and "/tmp" in ps["tmpfs"][0]
    assert ps["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / ps["build"]["context"] / "Dockerfile").is_file()
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src
            else:
                assert src in compose["volumes"], src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert (
        targets == ["pipeswitch:8080"] and prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    )
    # Grace period above the drain timeout, as in Kubernetes.
    drain = float(ps["environment"]["PIPESWITCH_DRAIN_TIMEOUT_SECS"])
    assert int(ps["stop_grace_period"].rstrip("s")) >= drain + 2


def test_dashboard_queries_use_exported_metrics() -> None:
    from pipeswitch.transports import metrics

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")} | {
        "pipeswitch_local_model_queue_depth"
    }
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pipeswitch.json").read_text())
    assert dash["uid"] == "pipeswitch" and dash["panels"]
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"pipeswitch_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            for n in names:
                base = re.sub(r"_(bucket|total|count|sum)$", "", n)
                assert base in exported, f"panel {panel['title']!r} queries unknown {n}"
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "pipeswitch.yaml").read_text()
    )
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def test_dockerfile_rules() -> None:
    lines = _dockerfile()
    final = lines[max(i for i, (ins, _) in enumerate(lines) if ins == "FROM") :]
    users = [a for ins, a in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage runs as root"
    # The health check follows PIPESWITCH_PORT (a fixed 8080 turns a moved server unhealthy).
    assert any(
        ins == "HEALTHCHECK" and "/health" in a and "PIPESWITCH_PORT" in a for ins, a in final
    )
    assert any(ins == "ARG" and a.startswith("WITH_LOCAL_MODELS") for ins, a in lines)
    assert any(ins == "STOPSIGNAL" and a == "SIGTERM" for ins, a in final)
    assert all("-slim" in a for ins, a in lines if ins == "FROM" and "python" in a)
    for ins, a in lines:
        if ins in ("ENV", "ARG", "LABEL"):
            for m in re.finditer(r"([A-Z_]*(KEY|TOKEN|PASSWORD|SECRET)[A-Z_]*)=(\S+)", a):
                raise AssertionError(f"secret baked into the image: {m.group(1)}")
        assert ins != "ADD" or not a.startswith("http"), "remote ADD"
    # Every folder the wheel maps into pipeswitch.* is copied into the build stage.
    import tomllib

    dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    copied = {a.split()[0].rstrip("/") for ins, a in lines if ins == "COPY" and "--from" not in a}
    assert dirs <= copied, f"not copied into the image: {dirs - copied}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "*.env"} <= set(ignore)


def test_dockerfile_lint_with_hadolint_if_present() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed on this machine")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_systemd_unit(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "pipeswitch.service").read_text()
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in unit.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        elif line and not line.startswith("#"):
            k, _, v = line.partition("=")
            sections[current].setdefault(k, []).append(v)
    svc = sections["Service"]
    assert svc["User"] == ["pipeswitch"] and svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"] and svc["PrivateTmp"] == ["yes"]
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "pipeswitch.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert all("#" not in v for v in env.values()), "systemd keeps inline comments in values"
    assert float(svc["TimeoutStopSec"][0]) >= float(env["PIPESWITCH_DRAIN_TIMEOUT_SECS"]) + 2
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # parsed above; nothing more to run here
    # verify needs the ExecStart binary and the env file to exist: point them at this checkout.
    exe = Path(sys.executable).parent / "pipeswitch"
    local = tmp_path / "pipeswitch.service"
    local.write_text(
        unit.replace("/opt/pipeswitch/bin/pipeswitch", str(exe)).replace(
            "/etc/pipeswitch/pipeswitch.env", str(DEPLOY / "systemd" / "pipeswitch.env.example")
        )
    )
    out = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
