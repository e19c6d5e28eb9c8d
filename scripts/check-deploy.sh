#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#   - every Kubernetes manifest and the kustomize output against the Kubernetes schemas
#     (kubernetes-validate); the Prometheus Operator CRDs structurally; the PrometheusRule is in
#     sync with deploy/prometheus/alerts.yml
#   - the alert rules' runbook_url links agree with the PrometheusRule (gen-prometheusrule.py --check)
#   - the Grafana dashboard: in sync with dashboards/build.py, and structurally (no Grafana schema
#     checker installs from pip or npm: @grafana/schema is TypeScript types only): every query
#     filtered by $instance, the variables, the Version and Downstream up panels
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
                        assert rule["alert"] and rule["expr"] and rule["annotations"]["runbook_url"], path
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

echo "== Grafana dashboard"
"$VENV/bin/python" dashboards/build.py --check
"$VENV/bin/python" - dashboards/tss-callback-gateway.json <<'PY'
import json, re, sys

path = sys.argv[1]
d = json.load(open(path))
variables = {v["name"]: v for v in d["templating"]["list"]}
assert list(variables) == ["datasource", "instance", "server", "event_server", "jaeger_url", "trace_service"], list(variables)
# Traces: a dashboard link and per-server data links into Jaeger's search, over the time range.
assert all(variables[n]["type"] == "textbox" for n in ("jaeger_url", "trace_service"))
jaeger = "${jaeger_url}/search?service=${trace_service}&start=${__from}000&end=${__to}000"
assert [l["url"].startswith(jaeger) for l in d["links"]] == [True], d["links"]
for name in ("instance", "server", "event_server"):
    v = variables[name]
    assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*", v
assert "tss_gateway_build_info" in variables["instance"]["query"]["query"]
assert 'instance=~"$instance"' in variables["server"]["query"]["query"]
assert 'instance=~"$instance"' in variables["event_server"]["query"]["query"]
assert len({p["id"] for p in d["panels"]}) == len(d["panels"]), "panel ids repeat"
selector = re.compile(r"\b(tss_gateway_\w+)(\{[^}]*\})?")
for p in d["panels"]:
    assert p["datasource"]["uid"] == "${datasource}", p["title"]
    g = p["gridPos"]
    assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
    assert p["targets"], p["title"]
    for t in p["targets"]:
        uses = selector.findall(t["expr"])
        assert uses, (p["title"], t["expr"])
        for metric, labels in uses:
            assert 'instance=~"$instance"' in labels, f"{p['title']}: {metric} is not filtered by $instance"
        if "by (server" in t["expr"]:
            wanted = '"$event_server"' if "tss_gateway_event_" in t["expr"] else '"$server"'
            assert f"server=~{wanted}" in t["expr"], f"{p['title']}: not filtered by ${wanted.strip(chr(34) + '$')}"
panels = {p["title"]: p for p in d["panels"]}
version = panels["Version"]
# tss_gateway_build_info is always 1: the stat shows the series name, the version label.
assert version["options"]["textMode"] == "name", version["options"]
assert [t["legendFormat"] for t in version["targets"]] == ["{{version}}"]
for title in ("Per-server latency p99", "Timeouts and failures per server"):
    links = panels[title]["fieldConfig"]["defaults"]["links"]
    assert any(l["url"].startswith(jaeger) and "${__field.labels.server}" in l["url"] for l in links), (title, links)
up = panels["Downstream up"]
mappings = up["fieldConfig"]["defaults"]["mappings"]
values = {k: v for m in mappings if m["type"] == "value" for k, v in m["options"].items()}
assert values["1"]["text"] == "UP" and values["1"]["color"] == "green", values
assert values["0"]["text"] == "DOWN" and values["0"]["color"] == "red", values
assert all("{{mode}}" in t["legendFormat"] and "mode" in t["expr"] for t in up["targets"]), up["targets"]
assert up["options"]["colorMode"] == "background"
print(f"{path}: {len(d['panels'])} panels, every query filtered by $instance; Version, Downstream up and the trace links checked")
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
