#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#   - every Kubernetes manifest and the kustomize output against the Kubernetes schemas
#     (kubernetes-validate); the Prometheus Operator CRDs structurally; the PrometheusRule is in
#     sync with deploy/prometheus/alerts.yml
#   - the gateway configs shipped in the ConfigMap and the compose stack pass `check-config`
#   - the compose file with `docker-compose config` (Debian's docker-compose)
#   - the systemd unit with `systemd-analyze verify`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venv}
BIN=${GATEWAY_BIN:-$PWD/target/release/tss-callback-gateway}

need=()
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v systemd-analyze >/dev/null || need+=(systemd)
if ((${#need[@]})); then
  sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null \
  || "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate PyYAML
[[ -x $BIN ]] || cargo build --release --locked --bin tss-callback-gateway

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== Kubernetes manifests"
"$VENV/bin/python" scripts/gen-prometheusrule.py --check
"$VENV/bin/python" - "$work/rendered.yaml" <<'PY'
import pathlib, subprocess, shutil, sys
import yaml
import kubernetes_validate

base = pathlib.Path("deploy/kubernetes")
kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
# The base uses only `resources`, so rendering it is concatenating them; kubectl's own kustomize,
# where installed, must agree.
docs = []
for r in kustomization["resources"]:
    docs += [d for d in yaml.safe_load_all((base / r).read_text()) if d]
unknown = set(kustomization) - {"apiVersion", "kind", "resources"}
assert not unknown, f"kustomization uses {unknown}: extend this renderer"
if shutil.which("kubectl"):
    out = subprocess.run(["kubectl", "kustomize", str(base)], check=True, capture_output=True, text=True).stdout
    theirs = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d)
    ours = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert theirs == ours, (theirs, ours)
    print("kubectl kustomize agrees:", len(ours), "objects")
pathlib.Path(sys.argv[1]).write_text(yaml.safe_dump_all(docs))

crds = {"ServiceMonitor", "PrometheusRule"}
for path in sorted(base.glob("*.yaml")):
    if path.name == "kustomization.yaml":
        continue
    for d in yaml.safe_load_all(path.read_text()):
        if d["kind"] in crds:
            # kubernetes-validate has no schemas for CRDs: check the fields the operator needs.
            assert d["apiVersion"] == "monitoring.coreos.com/v1", path
            if d["kind"] == "ServiceMonitor":
                assert d["spec"]["selector"]["matchLabels"] and d["spec"]["endpoints"][0]["port"], path
            else:
                for g in d["spec"]["groups"]:
                    for rule in g["rules"]:
                        assert rule["alert"] and rule["expr"] and rule["annotations"]["runbook"], path
            print(f"{path}: {d['kind']} checked structurally")
            continue
        kubernetes_validate.validate(d, "1.30", strict=True)
        print(f"{path}: {d['kind']} valid against Kubernetes 1.30")
for d in yaml.safe_load_all(pathlib.Path(sys.argv[1]).read_text()):
    if d["kind"] not in crds:
        kubernetes_validate.validate(d, "1.30", strict=True)
print("kustomize output valid")
dep = next(d for d in docs if d["kind"] == "StatefulSet")
spec = dep["spec"]["template"]["spec"]
# The audit log is evidence: a PersistentVolumeClaim per replica, never an emptyDir.
assert [t["metadata"]["name"] for t in dep["spec"]["volumeClaimTemplates"]] == ["audit"]
assert all("emptyDir" not in v for v in spec["volumes"]), "the audit log must not live in an emptyDir"
assert dep["spec"]["serviceName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
netpol = next(d for d in docs if d["kind"] == "NetworkPolicy")
assert netpol["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
assert {p["port"] for r in netpol["spec"]["ingress"] for p in r["ports"]} == {"http", "admin"}
c = spec["containers"][0]
assert dep["spec"]["replicas"] >= 2
assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert all("subPath" not in m for m in c["volumeMounts"]), "subPath mounts never see ConfigMap updates"
PY

echo "== shipped gateway configs"
"$BIN" keygen --out "$work/keys" --name k >/dev/null
check_config() { # $1: config text with key paths to replace
  sed -E "s#(tss_node_public_key|tss_node_event_public_key|pubkey_path): .*#\1: $work/keys/k-pub.key#; s#state_store: /.*#state_store: $work/state.db#; s#(gateway_private_key|downstream_signing_key): .*#\1: $work/keys/k-pri.pem#; s#audit_log: .*#audit_log: $work/audit.jsonl#" \
    > "$work/config.yaml"
  "$BIN" check-config -c "$work/config.yaml"
}
"$VENV/bin/python" -c 'import yaml,sys; print(yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))["data"]["config.yaml"])' | check_config
check_config < deploy/compose/gateway.yaml

echo "== docker-compose config"
docker-compose -f deploy/docker-compose.yml config -q
echo "deploy/docker-compose.yml valid"

echo "== systemd-analyze verify"
# verify insists that ExecStart exists: check a copy pointing at the built binary.
sed "s#/usr/local/bin/tss-callback-gateway#$BIN#g" deploy/systemd/tss-callback-gateway.service \
  > "$work/tss-callback-gateway.service"
systemd-analyze verify "$work/tss-callback-gateway.service"
echo "deploy/systemd/tss-callback-gateway.service valid"
