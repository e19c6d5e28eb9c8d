"""Writes tss-callback-gateway.json, the Grafana (10+) dashboard. Edit here, run
`python3 dashboards/build.py`, commit both. tests/observability evaluates every expression."""

import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
SRV = 'server=~"$server"'
panels = []


def panel(title, kind, targets, x, y, w=12, h=8, unit=None, stack=False, description=""):
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
        "options": {},
    }
    if kind == "timeseries" and stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 60}
    panels.append(p)


panel("Decisions per second by type and outcome", "timeseries",
      [("sum by (type, outcome) (rate(tss_gateway_requests_total[$__rate_interval]))", "{{type}} {{outcome}}")],
      0, 0, unit="reqps")
panel("Approval ratio", "stat",
      [('sum(rate(tss_gateway_requests_total{outcome="approved"}[$__rate_interval])) / sum(rate(tss_gateway_requests_total[$__rate_interval]))', "approved")],
      12, 0, w=6, unit="percentunit")
panel("Version", "stat", [("tss_gateway_build_info", "{{version}}")], 18, 0, w=6,
      description="tss_gateway_build_info per instance")
panel("Gateway latency p50 / p95 / p99", "timeseries",
      [(f"histogram_quantile({q}, sum by (le) (rate(tss_gateway_request_duration_seconds_bucket[$__rate_interval])))", f"p{int(q * 100)}")
       for q in (0.5, 0.95, 0.99)],
      0, 8, unit="s")
panel("Per-server latency p99", "timeseries",
      [(f"histogram_quantile(0.99, sum by (server, le) (rate(tss_gateway_downstream_duration_seconds_bucket{{{SRV}}}[$__rate_interval])))", "{{server}}")],
      12, 8, unit="s")
panel("Per-server outcomes", "timeseries",
      [(f"sum by (server, outcome) (rate(tss_gateway_downstream_requests_total{{{SRV}}}[$__rate_interval]))", "{{server}} {{outcome}}")],
      0, 16, unit="reqps", stack=True)
panel("Timeouts and failures per server", "timeseries",
      [(f'sum by (server, outcome) (rate(tss_gateway_downstream_requests_total{{{SRV}, outcome!~"approved|rejected|cancelled"}}[$__rate_interval]))', "{{server}} {{outcome}}")],
      12, 16, unit="reqps")
panel("Downstream up", "stat", [(f"tss_gateway_downstream_up{{{SRV}}}", "{{server}}")], 0, 24, w=8,
      description="1 = the last signed health ping was answered with status 0")
panel("In flight", "timeseries", [("sum(tss_gateway_in_flight_requests)", "in flight")], 8, 24, w=8)
panel("Embedded-rule rejections", "timeseries",
      [("sum by (type) (rate(tss_gateway_embedded_rejections_total[$__rate_interval]))", "{{type}}")], 16, 24, w=8, unit="reqps")
panel("Config reloads", "timeseries",
      [("sum by (result) (increase(tss_gateway_config_reloads_total[$__rate_interval]))", "{{result}}")], 0, 32, w=8)
panel("Time since the last good config load", "stat",
      [("time() - max(tss_gateway_config_last_reload_success_timestamp_seconds)", "since last good load")], 8, 32, w=8, unit="s")
panel("Callback servers by mode", "stat",
      [("sum by (mode) (tss_gateway_callback_servers)", "{{mode}}")], 16, 32, w=8)
panel("Shed: HTTP 503 beyond max_in_flight", "timeseries",
      [('sum(rate(tss_gateway_requests_total{outcome="overloaded"}[$__rate_interval]))', "overloaded")],
      0, 40, unit="reqps",
      description="requests answered 503 + Retry-After without being read; the TSS Node retries them")
panel("Per-server wait for a max_concurrent slot p99", "timeseries",
      [(f"histogram_quantile(0.99, sum by (server, le) (rate(tss_gateway_downstream_slot_wait_seconds_bucket{{{SRV}}}[$__rate_interval])))", "{{server}}")],
      12, 40, unit="s",
      description="only servers with max_concurrent set; a wait that reaches the deadline is a timeout")

panel("Events received by outcome", "timeseries",
      [("sum by (outcome) (rate(tss_gateway_events_total[$__rate_interval]))", "{{outcome}}")],
      0, 48, unit="reqps",
      description="events from the TSS Node: accepted (recorded, 200), invalid_token / invalid_request (400), failed (503: not recorded)")
panel("Event deliveries per server", "timeseries",
      [("sum by (server, outcome) (rate(tss_gateway_event_deliveries_total[$__rate_interval]))", "{{server}} {{outcome}}")],
      12, 48, unit="reqps", stack=True,
      description="attempts to deliver to each event server; refused = HTTP 4xx, retried like a failure; dropped = given up after event_retry_hours")
panel("Event backlog per server", "timeseries",
      [("sum by (server) (tss_gateway_event_backlog)", "{{server}}"),
       ("max by (server) (tss_gateway_event_oldest_undelivered_seconds)", "{{server}} oldest (s)")],
      0, 56,
      description="events recorded and not yet delivered, and the age of the oldest; the backlog alert fires past 15 minutes")
panel("Unapproved executions", "stat",
      [("sum by (type) (tss_gateway_unapproved_executions_total)", "{{type}}")],
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
        {"name": "server", "label": "Server", "type": "query", "datasource": DS,
         "query": {"query": "label_values(tss_gateway_downstream_requests_total, server)", "refId": "server"},
         "definition": "label_values(tss_gateway_downstream_requests_total, server)",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}

out = pathlib.Path(__file__).with_name("tss-callback-gateway.json")
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out}")
