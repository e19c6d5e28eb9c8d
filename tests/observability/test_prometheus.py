"""Observability against a real Prometheus (Debian's `prometheus` package): a known workload,
exact counter values, every dashboard and alert expression evaluated, promtool checks."""

import base64
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "config" / "samples"
DASHBOARD = ROOT / "dashboards" / "tss-callback-gateway.json"
PROM_DIR = ROOT / "deploy" / "prometheus"


def gateway_bin():
    path = pathlib.Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "release" / "tss-callback-gateway"))
    if not path.exists():
        pytest.fail(f"gateway binary {path} not found: run `cargo build --release` or set GATEWAY_BIN")
    return str(path)


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install Debian's prometheus package (scripts/test.sh does)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


class Downstream:
    """A callback server: verifies the gateway's RS256 token, answers per `behaviour`."""

    def __init__(self, name, key_pem, gateway_pub, behaviour):
        self.name, self.key, self.gateway_pub, self.behaviour = name, key_pem, gateway_pub, behaviour
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                token = parse_qs(body)["TSS_JWT_MSG"][0]
                claims = jwt.decode(token, outer.gateway_pub, algorithms=["RS256"])
                req = json.loads(base64.b64decode(claims["package_data"]))
                b = outer.behaviour
                if b == "fail":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"internal error")
                    return
                if b == "slow":
                    time.sleep(1.0)
                action = "REJECT" if b == "reject" else "APPROVE"
                resp = {"request_id": req["request_id"], "status": 0, "action": action,
                        "error": "policy says no" if b == "reject" else ""}
                answer = jwt.encode({"package_data": base64.b64encode(json.dumps(resp).encode()).decode(),
                                     "exp": int(time.time()) + 120, "iss": outer.name}, outer.key, algorithm="RS256")
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps(answer).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/check"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def node_token(node_key, payload: bytes):
    return jwt.encode({"package_data": base64.b64encode(payload).decode(), "exp": int(time.time()) + 120,
                       "iss": "tss-node"}, node_key, algorithm="RS256")


def send(url, token, gateway_pub):
    r = requests.post(url, data={"TSS_JWT_MSG": token}, timeout=15)
    claims = jwt.decode(json.loads(r.text), gateway_pub, algorithms=["RS256"])
    return json.loads(base64.b64decode(claims["package_data"]))


def sample(name, request_id, edit=None):
    data = json.loads((SAMPLES / f"{name}.json").read_text())
    data["request_id"] = request_id
    if edit:
        detail = json.loads(data["request_detail"])
        edit(detail)
        data["request_detail"] = json.dumps(detail)
    return json.dumps(data).encode()


RULES = """
embedded_risk_control_rules:
  enable: true
  key_gen:
    reject_all: false
    allow_list:
      - threshold: 2
        node_ids: [coboNodeA1b2c3, thirdPartyNodeD4e5f6, customerNodeG7h8i9]
"""


def start_prometheus(tmp, gateway_port, rule_files):
    """Prometheus scraping the gateway every second and evaluating `rule_files` every second;
    returns once it has scraped the gateway twice."""
    prom_port = free_port()
    prom_config = tmp / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [{"job_name": "tss-callback-gateway",
                            "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}],
    }))
    prom = subprocess.Popen([tool("prometheus"), f"--config.file={prom_config}", f"--storage.tsdb.path={tmp}/tsdb",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom_url = f"http://127.0.0.1:{prom_port}"
    wait_http(f"{prom_url}/-/ready", timeout=60)
    # Prometheus applies a new target only after its discovery settles (a few seconds): wait for
    # two scrapes of the gateway, so every counter's change after this lands between scrapes.
    deadline = time.time() + 60
    while time.time() < deadline:
        r = requests.get(f"{prom_url}/api/v1/query", params={"query": "count_over_time(up[1m])"}, timeout=5).json()
        if r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 2:
            return prom, prom_url
        time.sleep(0.5)
    prom.terminate()
    pytest.fail("Prometheus never scraped the gateway")


@pytest.fixture(scope="module")
def stack():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tss-obs-"))
    gw = gateway_bin()
    for name in ["tss-node", "tss-node-event", "gateway", "approver", "rejecter", "slow", "broken"]:
        subprocess.run([gw, "keygen", "--out", str(tmp), "--name", name], check=True, capture_output=True)
    gateway_pub = (tmp / "gateway-pub.key").read_bytes()
    behaviours = {"approver": "approve", "rejecter": "reject", "slow": "slow", "broken": "fail"}
    servers = {n: Downstream(n, (tmp / f"{n}-pri.pem").read_bytes(), gateway_pub, b) for n, b in behaviours.items()}
    # Who is asked about what, so that every outcome below is deterministic (no races between a
    # rejection and another server's answer).
    types = {"approver": "[key_gen, key_sign, key_reshare]", "rejecter": "[key_share_sign]",
             "slow": "[key_reshare]", "broken": "[key_gen]"}
    port = free_port()
    lines = [f"listen: 127.0.0.1:{port}", f"tss_node_public_key: {tmp}/tss-node-pub.key",
             f"gateway_private_key: {tmp}/gateway-pri.pem", "health_check_interval_ms: 500",
             "reload_settle_ms: 100", RULES,
             # Events on, to an event server that is not there: its series exist (backlog 0).
             f"tss_node_event_public_key: {tmp}/tss-node-event-pub.key",
             "event_servers:", "  - name: siem", f"    service_address: http://127.0.0.1:{free_port()}/v2/event",
             "callback_servers:"]
    for n, s in servers.items():
        lines += [f"  - name: {n}", f"    service_address: {s.url}", f"    pubkey_path: {tmp}/{n}-pub.key",
                  "    timeout_ms: 300", "    retries: 0", f"    request_types: {types[n]}"]
    config = tmp / "gateway.yaml"
    config.write_text("\n".join(lines) + "\n")
    gateway = subprocess.Popen([gw, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz")

    prom, prom_url = start_prometheus(tmp, port, [PROM_DIR / "alerts.yml"])

    node_key = (tmp / "tss-node-pri.pem").read_bytes()
    url = f"{base}/v2/check"
    answers = []
    for i in range(3):
        answers.append(send(url, node_token(node_key, sample("key_sign", f"sign-{i}")), gateway_pub))
    for i in range(2):
        answers.append(send(url, node_token(node_key, sample("key_share_sign", f"share-{i}")), gateway_pub))
    for i in range(2):
        answers.append(send(url, node_token(node_key, sample("key_reshare", f"reshare-{i}")), gateway_pub))
    answers.append(send(url, node_token(node_key, sample("key_gen", "gen-allowed")), gateway_pub))
    answers.append(send(url, node_token(node_key, sample("key_gen", "gen-t1", lambda d: d.update(threshold=1))), gateway_pub))
    for i in range(2):
        answers.append(send(url, "not-a-token", gateway_pub))
    answers.append(send(url, node_token(node_key, b"hello"), gateway_pub))
    # One good reload (SIGHUP), then an invalid file left on disk for 2.5 s: refused once it
    # settled (~0.1 s), retried and refused again 1 s later (the next retry, 2 s after that,
    # never comes: the good file is back first, which clears the failure without a reload).
    gateway.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    good = config.read_text()
    config.write_text(good + "bogus: 1\n")
    time.sleep(2.5)
    config.write_text(good)
    time.sleep(4)  # several scrapes after the workload

    yield {"prom": prom_url, "gateway": base, "answers": answers, "servers": list(servers)}
    gateway.terminate()
    prom.terminate()
    gateway.wait(timeout=15)
    prom.wait(timeout=15)
    for s in servers.values():
        s.server.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def query(prom, expr):
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def value(prom, expr):
    result = query(prom, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def test_the_workload_got_the_expected_answers(stack):
    got = [(a["status"], a["action"]) for a in stack["answers"]]
    assert got == [(0, "APPROVE")] * 3 + [(0, "REJECT")] * 2 + [(30, "REJECT")] * 2 + [(30, "REJECT"), (0, "REJECT")] \
        + [(20, "REJECT")] * 2 + [(10, "REJECT")]


def test_exact_counter_values_in_prometheus(stack):
    p = stack["prom"]
    expected = {
        'tss_gateway_requests_total{type="key_sign",outcome="approved"}': 3,
        'tss_gateway_requests_total{type="key_share_sign",outcome="rejected"}': 2,
        'tss_gateway_requests_total{type="key_reshare",outcome="failed"}': 2,
        'tss_gateway_requests_total{type="key_gen",outcome="failed"}': 1,
        'tss_gateway_requests_total{type="key_gen",outcome="rejected"}': 1,
        'tss_gateway_requests_total{type="unknown",outcome="invalid_token"}': 2,
        'tss_gateway_requests_total{type="unknown",outcome="invalid_request"}': 1,
        'tss_gateway_embedded_rejections_total{type="key_gen"}': 1,
        'tss_gateway_downstream_requests_total{server="approver",outcome="approved"}': 6,
        'tss_gateway_downstream_requests_total{server="rejecter",outcome="rejected"}': 2,
        'tss_gateway_downstream_requests_total{server="slow",outcome="timeout"}': 2,
        'tss_gateway_downstream_requests_total{server="broken",outcome="http_error"}': 1,
        # SIGHUP; putting the running config back is no reload, it only clears the failure.
        'tss_gateway_config_reloads_total{result="success"}': 1,
        'tss_gateway_config_reloads_total{result="failure"}': 2,
        'tss_gateway_downstream_up{server="approver"}': 1,
        'tss_gateway_downstream_up{server="rejecter"}': 1,
        'tss_gateway_downstream_up{server="slow"}': 0,
        'tss_gateway_downstream_up{server="broken"}': 0,
        'tss_gateway_callback_servers{mode="enforce"}': 4,
        'tss_gateway_callback_servers{mode="shadow"}': 0,
        'tss_gateway_in_flight_requests': 0,
        'sum(tss_gateway_request_duration_seconds_count)': 12,
        'tss_gateway_downstream_duration_seconds_count{server="approver"}': 6,
    }
    for series, want in expected.items():
        assert value(p, series) == want, series
    assert value(p, "count(tss_gateway_build_info == 1)") == 1
    # Every metric name of the contract is exported.
    names = {m for m in requests.get(f"{p}/api/v1/label/__name__/values", timeout=10).json()["data"]}
    for m in ["tss_gateway_requests_total", "tss_gateway_request_duration_seconds_bucket",
              "tss_gateway_downstream_requests_total", "tss_gateway_downstream_duration_seconds_bucket",
              "tss_gateway_downstream_up", "tss_gateway_in_flight_requests", "tss_gateway_embedded_rejections_total",
              "tss_gateway_config_reloads_total", "tss_gateway_config_last_reload_success_timestamp_seconds",
              "tss_gateway_callback_servers", "tss_gateway_build_info", "tss_gateway_connections_refused_total",
              "tss_gateway_audit_seq", "tss_gateway_audit_discontinuities_total",
              "tss_gateway_audit_write_failures_total", "tss_gateway_config_reload_failing",
              "tss_gateway_events_total", "tss_gateway_event_deliveries_total", "tss_gateway_event_backlog",
              "tss_gateway_event_oldest_undelivered_seconds", "tss_gateway_unapproved_executions_total"]:
        assert m in names, m


def dashboard_expressions():
    d = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values"):
            metric = re.match(r"label_values\((\w+)", q["query"]).group(1)
            exprs.append((f"variable {v['name']}", metric))
    return d, exprs


def substitute(expr, servers):
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
            .replace("${server}", "|".join(servers)).replace("$server", "|".join(servers))
            .replace("$event_server", ".*").replace("$instance", ".*"))


def test_every_dashboard_expression_returns_data(stack):
    d, exprs = dashboard_expressions()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance", "server", "event_server", "jaeger_url", "trace_service"], names
    assert len(exprs) >= 13
    for title, expr in exprs:
        assert query(stack["prom"], substitute(expr, stack["servers"])), f"no data for {title}: {expr}"


def test_the_dashboard_shows_the_version_string_and_each_servers_mode(stack):
    d, _ = dashboard_expressions()
    panels = {p["title"]: p for p in d["panels"]}
    version = subprocess.run([gateway_bin(), "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    (target,) = panels["Version"]["targets"]
    series = query(stack["prom"], substitute(target["expr"], stack["servers"]))
    # The stat shows the series' name (textMode "name"), which the legend makes the version label.
    assert panels["Version"]["options"]["textMode"] == "name" and target["legendFormat"] == "{{version}}"
    assert [s["metric"]["version"] for s in series] == [version], series
    (target,) = panels["Downstream up"]["targets"]
    series = query(stack["prom"], substitute(target["expr"], stack["servers"]))
    shown = {s["metric"]["server"]: (s["metric"]["mode"], s["value"][1]) for s in series}
    assert shown == {"approver": ("enforce", "1"), "rejecter": ("enforce", "1"),
                     "slow": ("enforce", "0"), "broken": ("enforce", "0")}, shown
    assert "{{mode}}" in target["legendFormat"]


def alert_rules():
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


COMPARISON = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[0-9.e+-]+\s*$")


def test_every_alert_expression_returns_data(stack, shadow_stack):
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"TssGatewayDownstreamDown", "TssGatewayDownstreamFailing",
                                           "TssGatewaySlow", "TssGatewayFailedAnswers", "TssGatewayReloadFailed"}
    for r in rules:
        for key in ("summary", "description", "runbook_url"):
            assert r["annotations"].get(key), (r["alert"], key)
        measure = COMPARISON.sub("", r["expr"].strip())
        assert measure != r["expr"].strip(), f"{r['alert']}: expression is not `<measure> <op> <threshold>`"
        # The workload stack has no shadow server; the shadow stack has.
        assert query(stack["prom"], measure) or query(shadow_stack["prom"], measure), \
            f"no data for {r['alert']}: {measure}"
    # This workload makes some alerts' conditions true right away.
    firing_now = {r["alert"] for r in rules if query(stack["prom"], r["expr"])}
    assert {"TssGatewayDownstreamDown", "TssGatewayDownstreamFailing", "TssGatewayFailedAnswers",
            "TssGatewayReloadFailed"} <= firing_now, firing_now
    # Prometheus loaded the rule file itself without errors.
    groups = requests.get(f"{stack['prom']}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert all(rule["health"] in ("ok", "unknown") for g in groups for rule in g["rules"])


def test_runbooks_are_full_urls_to_headings_of_the_readme():
    readme = (ROOT / "README.md").read_text().lower()
    bases = set()
    for r in alert_rules():
        base, _, anchor = r["annotations"]["runbook_url"].partition("#")
        assert re.match(r"^https?://[^/\s]+/", base), (r["alert"], base)
        assert anchor == f"alert-{r['alert'].lower()}", (r["alert"], anchor)
        assert f"\n### alert: {r['alert'].lower()}\n" in readme, f"README has no runbook heading for {r['alert']}"
        bases.add(base)
    assert len(bases) == 1, bases


def test_promtool_accepts_the_config_and_rules():
    promtool = tool("promtool")
    out = subprocess.run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "rules", str(PROM_DIR / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts(tmp_path):
    """tests/observability/alerts_test.yml: only an enforcing server being down pages, a shadow
    one is a later warning, a mode switch resolves the page, a reload failure lasts as long as the
    bad file, a missing gateway pages. The test expects the shipped runbook base; a copy whose
    base was changed with --runbook-base is tested with its own base put in."""
    base = alert_rules()[0]["annotations"]["runbook_url"].split("#", 1)[0]
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "observability").mkdir(parents=True)
    shutil.copy(PROM_DIR / "alerts.yml", tmp_path / "deploy" / "prometheus" / "alerts.yml")
    test = (ROOT / "tests" / "observability" / "alerts_test.yml").read_text()
    assert SHIPPED_RUNBOOK_BASE in test
    unit = tmp_path / "tests" / "observability" / "alerts_test.yml"
    unit.write_text(test.replace(SHIPPED_RUNBOOK_BASE, base))
    out = subprocess.run([tool("promtool"), "test", "rules", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


SHIPPED_RUNBOOK_BASE = "https://github.com/cobo/tss-callback-gateway/blob/main/README.md"


# === a shadow server does not page ===


@pytest.fixture(scope="module")
def shadow_stack():
    """A gateway with an enforcing server and a shadow server that both fail their health pings
    (HTTP 500, at once), and one enforcing server that answers (a long timeout: a busy machine
    must not make it look down), scraped by a Prometheus that evaluates a copy of
    alerts.yml without `for:` (an alert fires at the first evaluation that matches)."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tss-obs-shadow-"))
    gw = gateway_bin()
    for name in ["tss-node", "gateway", "guard", "canary", "approver"]:
        subprocess.run([gw, "keygen", "--out", str(tmp), "--name", name], check=True, capture_output=True)
    gateway_pub = (tmp / "gateway-pub.key").read_bytes()
    modes = {"guard": ("fail", "enforce"), "canary": ("fail", "shadow"), "approver": ("approve", "enforce")}
    servers = {n: Downstream(n, (tmp / f"{n}-pri.pem").read_bytes(), gateway_pub, b) for n, (b, _) in modes.items()}
    port = free_port()
    lines = [f"listen: 127.0.0.1:{port}", f"tss_node_public_key: {tmp}/tss-node-pub.key",
             f"gateway_private_key: {tmp}/gateway-pri.pem", "health_check_interval_ms: 300",
             "callback_servers:"]
    for n, s in servers.items():
        lines += [f"  - name: {n}", f"    service_address: {s.url}", f"    pubkey_path: {tmp}/{n}-pub.key",
                  f"    mode: {modes[n][1]}", "    timeout_ms: 5000", "    retries: 0"]
    config = tmp / "gateway.yaml"
    config.write_text("\n".join(lines) + "\n")
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    fast = tmp / "alerts-without-for.yml"
    fast.write_text(yaml.safe_dump(rules, sort_keys=False))
    gateway = subprocess.Popen([gw, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = None
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        prom, prom_url = start_prometheus(tmp, port, [fast])
        yield {"prom": prom_url}
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
        if prom:
            prom.terminate()
            prom.wait(timeout=15)
        for s in servers.values():
            s.server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def rule_alerts(prom):
    """{alert name: [its active alerts, with labels and annotations]} from /api/v1/rules."""
    groups = requests.get(f"{prom}/api/v1/rules", params={"type": "alert"}, timeout=10).json()["data"]["groups"]
    return {r["name"]: r["alerts"] for g in groups for r in g["rules"]}


def by_server(alerts):
    return {a["labels"].get("server"): a for a in alerts}


def test_a_down_enforcing_server_pages_and_a_down_shadow_server_does_not(shadow_stack):
    p = shadow_stack["prom"]
    # Each evaluation where an alert is active writes an ALERTS sample. Two evaluations with the
    # shadow warning firing: the second ran after the canary's series was in, for every rule of
    # the group (they run in order, on the same data), so TssGatewayDownstreamDown saw it too.
    fired_twice = ('count_over_time(ALERTS{alertname="TssGatewayShadowDownstreamDown", server="canary", '
                   'alertstate="firing"}[5m]) >= 2 and on() count_over_time(ALERTS{'
                   'alertname="TssGatewayDownstreamDown", server="guard", alertstate="firing"}[5m]) >= 1')
    deadline = time.time() + 60
    while not query(p, fired_twice):
        assert time.time() < deadline, f"the down servers' alerts never fired: {rule_alerts(p)}"
        time.sleep(0.5)
    # The gateway exports each server's mode beside its health.
    assert value(p, 'tss_gateway_downstream_up{server="guard", mode="enforce"}') == 0
    assert value(p, 'tss_gateway_downstream_up{server="canary", mode="shadow"}') == 0
    assert value(p, 'tss_gateway_downstream_up{server="approver", mode="enforce"}') == 1
    assert query(p, 'ALERTS{server="canary", severity="critical"}[5m]') == []
    assert query(p, 'ALERTS{server="approver"}[5m]') == []
    alerts = rule_alerts(p)
    pages = [a for name, active in alerts.items() for a in active if a["labels"]["severity"] == "critical"]
    assert {a["labels"].get("server") for a in pages if a["labels"].get("server")} == {"guard"}, pages
    page = by_server(alerts["TssGatewayDownstreamDown"])["guard"]
    assert page["labels"]["mode"] == "enforce"
    assert page["annotations"]["runbook_url"].endswith("README.md#alert-tssgatewaydownstreamdown")
    assert "rejected with status 30" in page["annotations"]["description"]
    warnings = by_server(alerts["TssGatewayShadowDownstreamDown"])
    assert set(warnings) == {"canary"}, warnings
    warning = warnings["canary"]
    assert warning["labels"]["severity"] == "warning" and warning["labels"]["mode"] == "shadow"
    # Its wording does not claim that approvals stop.
    text = warning["annotations"]["summary"] + " " + warning["annotations"]["description"]
    assert "shadow" in text and "unchanged" in text
    assert "status 30" not in text and "rejected" not in text, text
    assert warning["annotations"]["runbook_url"].endswith("README.md#alert-tssgatewayshadowdownstreamdown")
