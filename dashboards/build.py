"""Writes tss-callback-gateway.json, the Grafana (10+) dashboard. Edit here, run
`python3 dashboards/build.py`, commit both (`--check`: fail if the JSON is stale).
tests/observability evaluates every expression; scripts/check-deploy.sh checks the structure."""

import json
import pathlib
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
# Every query is filtered by the `instance` variable (Kubernetes runs 2 replicas; check-deploy.sh
# checks that none is missing); per-server ones by `server` too.
INST = 'instance=~"$instance"'
SRV = f'{INST}, server=~"$server"'
# Event servers are another set of names (`event_servers`), with a variable of their own.
EVS = f'{INST}, server=~"$event_server"'
# Traces: the gateway exports one trace per request (README "Traces"); these links open Jaeger's
# search over the dashboard's time range (Jaeger takes microseconds: Grafana's ms + "000").
# Exemplars would need OpenMetrics exemplars from the prometheus crate, which it does not offer.
JAEGER = "${jaeger_url}/search?service=${trace_service}&start=${__from}000&end=${__to}000&limit=100"


def trace_link(title, tags):
    """A data link to the traces whose spans carry `tags` (JSON, URL-encoded by hand: Jaeger's
    search takes `tags={"key":"value"}`)."""
    encoded = "%7B" + "%2C".join(f"%22{k}%22%3A%22{v}%22" for k, v in tags.items()) + "%7D"
    return {"title": title, "url": f"{JAEGER}&tags={encoded}", "targetBlank": True}


panels = []


def panel(title, kind, targets, x, y, w=12, h=8, unit=None, stack=False, description="", options=None,
          mappings=None, thresholds=None, links=None):
    p = {
        "id": len(panels) + 1,
        "title": title,
        "description": description,
        "type": kind,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit or "short"}, "overrides": []},
        "options": options or {},
    }
    if mappings:
        p["fieldConfig"]["defaults"]["mappings"] = mappings
    if links:
        p["fieldConfig"]["defaults"]["links"] = links
    if thresholds:
        p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
    if kind == "timeseries" and stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 60}
    panels.append(p)


panel("Decisions per second by type and outcome", "timeseries",
      [(f"sum by (type, outcome) (rate(tss_gateway_requests_total{{{INST}}}[$__rate_interval]))", "{{type}} {{outcome}}")],
      0, 0, unit="reqps",
      links=[trace_link("Traces: ${__field.labels.type} ${__field.labels.outcome}",
                        {"type": "${__field.labels.type}", "outcome": "${__field.labels.outcome}"})])
panel("Approval ratio", "stat",
      [(f'sum(rate(tss_gateway_requests_total{{{INST}, outcome="approved"}}[$__rate_interval])) / sum(rate(tss_gateway_requests_total{{{INST}}}[$__rate_interval]))', "approved")],
      12, 0, w=6, unit="percentunit")
# The value of tss_gateway_build_info is always 1: show the series name, its version label.
panel("Version", "stat", [(f"count by (version) (tss_gateway_build_info{{{INST}}})", "{{version}}")], 18, 0, w=6,
      description="the version label of tss_gateway_build_info; one per version while replicas differ",
      options={"textMode": "name", "colorMode": "none", "graphMode": "none", "justifyMode": "center",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("Gateway latency p50 / p95 / p99", "timeseries",
      [(f"histogram_quantile({q}, sum by (le) (rate(tss_gateway_request_duration_seconds_bucket{{{INST}}}[$__rate_interval])))", f"p{int(q * 100)}")
       for q in (0.5, 0.95, 0.99)],
      0, 8, unit="s",
      links=[{"title": "Traces in this time range", "url": JAEGER, "targetBlank": True}])
panel("Per-server latency p99", "timeseries",
      [(f"histogram_quantile(0.99, sum by (server, le) (rate(tss_gateway_downstream_duration_seconds_bucket{{{SRV}}}[$__rate_interval])))", "{{server}}")],
      12, 8, unit="s",
      links=[trace_link("Traces calling ${__field.labels.server}", {"server": "${__field.labels.server}"})])
panel("Per-server outcomes", "timeseries",
      [(f"sum by (server, outcome) (rate(tss_gateway_downstream_requests_total{{{SRV}}}[$__rate_interval]))", "{{server}} {{outcome}}")],
      0, 16, unit="reqps", stack=True)
panel("Timeouts and failures per server", "timeseries",
      [(f'sum by (server, outcome) (rate(tss_gateway_downstream_requests_total{{{SRV}, outcome!~"approved|rejected|cancelled"}}[$__rate_interval]))', "{{server}} {{outcome}}")],
      12, 16, unit="reqps",
      links=[trace_link("Traces: ${__field.labels.server} ${__field.labels.outcome}",
                        {"server": "${__field.labels.server}", "outcome": "${__field.labels.outcome}"})])
panel("Downstream up", "stat",
      [(f"min by (server, mode) (tss_gateway_downstream_up{{{SRV}}})", "{{server}} ({{mode}})")], 0, 24, w=8,
      description="UP: the last signed health ping was answered with status 0 (by every selected replica); "
                  "DOWN: it was not. Only a down enforcing server stops approvals.",
      options={"textMode": "value_and_name", "colorMode": "background", "graphMode": "none",
               "justifyMode": "auto", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
      mappings=[{"type": "value", "options": {"1": {"text": "UP", "color": "green", "index": 0},
                                              "0": {"text": "DOWN", "color": "red", "index": 1}}}],
      thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
panel("In flight", "timeseries", [(f"sum(tss_gateway_in_flight_requests{{{INST}}})", "in flight")], 8, 24, w=8)
panel("Embedded-rule rejections", "timeseries",
      [(f"sum by (type) (rate(tss_gateway_embedded_rejections_total{{{INST}}}[$__rate_interval]))", "{{type}}")], 16, 24, w=8, unit="reqps")
panel("Config reloads", "timeseries",
      [(f"sum by (result) (increase(tss_gateway_config_reloads_total{{{INST}}}[$__rate_interval]))", "{{result}}")], 0, 32, w=8)
panel("Time since the last good config load", "stat",
      [(f"time() - max(tss_gateway_config_last_reload_success_timestamp_seconds{{{INST}}})", "since last good load")], 8, 32, w=8, unit="s")
panel("Callback servers by mode", "stat",
      [(f"max by (mode) (tss_gateway_callback_servers{{{INST}}})", "{{mode}}")], 16, 32, w=8)
panel("Shed: HTTP 503 beyond max_in_flight", "timeseries",
      [(f'sum(rate(tss_gateway_requests_total{{{INST}, outcome="overloaded"}}[$__rate_interval]))', "overloaded")],
      0, 40, unit="reqps",
      description="requests answered 503 + Retry-After without being read; the TSS Node retries them")
panel("Per-server wait for a max_concurrent slot p99", "timeseries",
      [(f"histogram_quantile(0.99, sum by (server, le) (rate(tss_gateway_downstream_slot_wait_seconds_bucket{{{SRV}}}[$__rate_interval])))", "{{server}}")],
      12, 40, unit="s",
      description="only servers with max_concurrent set; a wait that reaches the deadline is a timeout")

panel("Events received by outcome", "timeseries",
      [(f"sum by (outcome) (rate(tss_gateway_events_total{{{INST}}}[$__rate_interval]))", "{{outcome}}")],
      0, 48, unit="reqps",
      description="events from the TSS Node: accepted (recorded, 200), invalid_token / invalid_request (400), failed (503: not recorded)")
panel("Event deliveries per server", "timeseries",
      [(f"sum by (server, outcome) (rate(tss_gateway_event_deliveries_total{{{EVS}}}[$__rate_interval]))", "{{server}} {{outcome}}")],
      12, 48, unit="reqps", stack=True,
      description="attempts to deliver to each event server; refused = HTTP 4xx, retried like a failure; dropped = given up after event_retry_hours")
panel("Event backlog per server", "timeseries",
      # Replicas sharing a PostgreSQL store each report the same backlog: max, not sum.
      [(f"max by (server) (tss_gateway_event_backlog{{{EVS}}})", "{{server}}"),
       (f"max by (server) (tss_gateway_event_oldest_undelivered_seconds{{{EVS}}})", "{{server}} oldest (s)")],
      0, 56,
      description="events recorded and not yet delivered, and the age of the oldest; the backlog alert fires past 15 minutes")
panel("Unapproved executions", "stat",
      [(f"sum by (type) (tss_gateway_unapproved_executions_total{{{INST}}})", "{{type}}")],
      12, 56,
      description="request.*.succeeded events for requests no gateway replica approved; any increase is a critical alert")

dashboard = {
    "__inputs": [],
    "title": "tss-callback-gateway",
    "uid": "tss-callback-gateway",
    "description": "Decisions, latency and downstream health of tss-callback-gateway",
    "tags": ["tss", "cobo", "callback"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "query": {"query": "label_values(tss_gateway_build_info, instance)", "refId": "instance"},
         "definition": "label_values(tss_gateway_build_info, instance)",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        {"name": "server", "label": "Server", "type": "query", "datasource": DS,
         "query": {"query": f"label_values(tss_gateway_downstream_requests_total{{{INST}}}, server)", "refId": "server"},
         "definition": f"label_values(tss_gateway_downstream_requests_total{{{INST}}}, server)",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        {"name": "event_server", "label": "Event server", "type": "query", "datasource": DS,
         "query": {"query": f"label_values(tss_gateway_event_backlog{{{INST}}}, server)", "refId": "event_server"},
         "definition": f"label_values(tss_gateway_event_backlog{{{INST}}}, server)",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        {"name": "jaeger_url", "label": "Jaeger UI", "type": "textbox", "query": "http://127.0.0.1:16686",
         "current": {"text": "http://127.0.0.1:16686", "value": "http://127.0.0.1:16686"}, "hide": 0,
         "description": "base URL of the Jaeger UI that receives the gateway's traces"},
        {"name": "trace_service", "label": "Trace service", "type": "textbox", "query": "tss-callback-gateway",
         "current": {"text": "tss-callback-gateway", "value": "tss-callback-gateway"}, "hide": 2,
         "description": "service.name of the gateway's spans"},
    ]},
    "annotations": {"list": []},
    "links": [{"title": "Traces (Jaeger)", "type": "link", "url": JAEGER, "targetBlank": True,
               "icon": "external link", "tooltip": "this dashboard's time range in Jaeger's search"}],
    "panels": panels,
}

out = pathlib.Path(__file__).with_name("tss-callback-gateway.json")
text = json.dumps(dashboard, indent=2) + "\n"
if "--check" in sys.argv:
    if out.read_text() != text:
        sys.exit(f"{out} is stale: run python3 dashboards/build.py")
    print(f"{out.name} matches dashboards/build.py")
else:
    out.write_text(text)
    print(f"wrote {out}")
