"""The console's pages: plain HTML strings, every value from the network escaped (`e`)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from customs_edge.hub.console.queries import SILENT_AFTER_S, AlertRow, Filters
from customs_edge.hub.console.state import Action, Session

DISPOSITIONS = ("referred after a clinical thermometer reading", "afebrile on re-check: released",
                "lot released after resample", "lot held", "seized", "sent to lab", "false alarm",
                "technician called")
NAV = (("/alerts", "Alerts"), ("/fleet", "Fleet"), ("/lots", "Ore lots"), ("/lanes", "Gate lanes"),
       ("/review", "Image review"), ("/inspect", "Remote inspection"), ("/audit", "Audit trail"))
INSPECT_SECONDS = (30, 60, 120)


def e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def as_list(x: Any) -> list[Any]:
    """A payload's list field as a list: a unit may send one value, or none, where a list is meant."""
    return x if isinstance(x, list) else [] if x is None else [x]


def num(x: Any, default: float = 0.0) -> float:
    """A payload's number field, or `default` for anything else (a string, a list, an object)."""
    return float(x) if isinstance(x, (int, float)) else default


def when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def age(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def page(title: str, body: str, s: Session | None, *, here: str = "") -> str:
    nav = "".join(f'<a href="{h}"{" class=here" if h == here else ""}>{t}</a>' for h, t in NAV) if s else ""
    who = (f'<form method="post" action="/logout" class="who"><span>{e(s.user)} ({e(s.role)})</span>'
           f'<input type="hidden" name="csrf" value="{e(s.csrf)}"><button>Log out</button></form>') if s else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} - customs-edge</title><link rel=stylesheet href="/static/console.css">'
            '<script src="/static/console.js" defer></script></head><body>'
            f'<header><b>customs-edge</b><nav>{nav}</nav><button id=mute type=button>Sound on</button>{who}</header>'
            f"<main><h1>{e(title)}</h1>{body}</main></body></html>")


def summary(a: AlertRow) -> str:
    """One line saying what the alert is about, from its payload."""
    p = a.payload
    match a.type:
        case "fever_alert":
            return (f"{p.get('estimate_c')} °C (threshold {p.get('threshold_c')} °C)"
                    + ("" if p.get("valid", True) else ": re-screen, " + ", ".join(map(str, as_list(p.get("tags"))))))
        case "fever_confirmation":
            return (f"clinical {p.get('measured_c')} °C: " + ("confirmed" if p.get("confirmed") else "not confirmed")
                    + f" (screened {p.get('estimate_c')} °C, by {p.get('by')})")
        case "lot_hold":
            return f"lot {p.get('lot_id')}: " + "; ".join(map(str, as_list(p.get("reasons"))))
        case "radiation_alarm":
            keys = ("channel", "cps", "gamma_cps", "neutron_cps", "lot_id")
            return ", ".join(f"{k} {p[k]}" for k in keys if k in p) or "radiation alarm"
        case "driver_fault":
            return f"{p.get('role')}: {p.get('error')}"
        case _:
            shown = [f"{k} {v}" for k, v in p.items() if isinstance(v, (int, float, str)) and k != "thumbnail"][:4]
            return ", ".join(shown)


def alert_row(a: AlertRow, state: str) -> str:
    href = f"/alert/{quote(a.device_id, safe='')}/{a.seq}"
    return (f'<tr class="alert {e(state)}" data-key="{e(a.device_id)}/{a.seq}"><td>{when(a.received_at)}</td>'
            f"<td>{e(a.site)}</td><td>{e(a.device_id)}</td><td>{e(a.unit_type)}</td><td>{e(a.type)}</td>"
            f'<td>{e(summary(a))}</td><td><span class="state {e(state)}">{e(state)}</span></td>'
            f'<td><a href="{href}">open</a></td></tr>')


def alerts_page(rows: Sequence[tuple[AlertRow, str]], f: Filters, choices: dict[str, list[str]], s: Session,
                newest: float) -> str:
    def select(name: str, label: str, values: Iterable[str]) -> str:
        current = getattr(f, name) or ""
        opts = "".join(f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(v)}</option>'
                       for v in ["", *values])
        return f'<label>{label} <select name="{name}">{opts}</select></label>'

    form = ('<form class=filters method=get action="/alerts">' + select("site", "Site", choices["site"])
            + select("unit_type", "Unit type", choices["unit_type"]) + select("device", "Device", choices["device"])
            + select("kind", "Kind", choices["kind"])
            + select("state", "State", ["new", "acknowledged", "disposed"]) + "<button>Filter</button></form>")
    query = urlencode({k: v for k, v in vars(f).items() if v})
    body = (form + f'<table id=alerts data-events="/events?{e(query)}" data-after="{newest!r}"><thead><tr>'
            "<th>received</th><th>site</th><th>device</th><th>unit</th><th>kind</th><th>what</th><th>state</th>"
            "<th></th></tr></thead><tbody>" + "".join(alert_row(a, st) for a, st in rows) + "</tbody></table>"
            + ("" if rows else "<p class=empty>No alerts.</p>"))
    return page("Alerts", body, s, here="/alerts")


def thumbnail_svg(t: Any) -> str:
    """A fever alert's thermal thumbnail (°C x 10, row-major) as an SVG heat map."""
    try:
        w, h, data, scale = int(t["w"]), int(t["h"]), list(t["data"]), float(t.get("scale", 0.1))
        values = [float(v) * scale for v in data[:w * h]]
    except (KeyError, TypeError, ValueError):
        return ""
    if not values or w <= 0 or h <= 0 or w * h > 20000:
        return ""
    lo, hi = min(values), max(values)
    cells = []
    for i, v in enumerate(values):
        x = (v - lo) / (hi - lo) if hi > lo else 0.0
        cells.append(f'<rect x="{i % w}" y="{i // w}" width="1" height="1" '
                     f'fill="rgb({int(255 * x)},{int(80 + 100 * (1 - abs(x - 0.5) * 2))},{int(255 * (1 - x))})"/>')
    return (f'<figure><svg class=thermal viewBox="0 0 {w} {h}" width="{w * 8}" height="{h * 8}">{"".join(cells)}'
            f"</svg><figcaption>{lo:.1f} to {hi:.1f} °C</figcaption></figure>")


def alert_page(a: AlertRow, state: str, actions: Sequence[Action], s: Session) -> str:
    fields = "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(v) if isinstance(v, (dict, list)) else v)}</td></tr>"
                     for k, v in a.payload.items() if k != "thumbnail")
    thumb = thumbnail_svg(a.payload["thumbnail"]) if "thumbnail" in a.payload else ""
    base = f"/alert/{quote(a.device_id, safe='')}/{a.seq}"
    csrf = f'<input type="hidden" name="csrf" value="{e(s.csrf)}">'
    if s.may("act"):
        opts = "".join(f'<option value="{e(d)}">{e(d)}</option>' for d in DISPOSITIONS)
        forms = (f'<form method=post action="{base}/ack" class=act>{csrf}'
                 f'<button id=ack{" disabled" if state != "new" else ""}>Acknowledge</button></form>'
                 f'<form method=post action="{base}/dispose" class=act>{csrf}'
                 f'<label>Disposition <select name=disposition id=disposition>{opts}</select></label>'
                 '<label>Note <input name=note id=note maxlength=500 placeholder="e.g. clinical thermometer 38.2 °C">'
                 "</label><button id=dispose>Record disposition</button></form>")
    else:
        forms = "<p>Your role may look, not act: an officer acknowledges and disposes.</p>"
    trail = "".join(f"<li>{when(x.at)}: <b>{e(x.action)}</b> by {e(x.user)} ({e(x.role)})"
                    f"{': ' + e(x.detail) if x.detail else ''}</li>" for x in actions)
    body = (f'<p>{e(a.device_id)} seq {a.seq}, {e(a.unit_type)} at {e(a.site) or "-"}; unit time {when(a.ts)}, '
            f'at the hub {when(a.received_at)}. State: <span class="state {e(state)}" id=state>{e(state)}</span></p>'
            f"<p class=what>{e(summary(a))}</p>{thumb}{forms}<h2>Audit trail</h2>"
            f"<ol id=trail>{trail or '<li>nothing yet</li>'}</ol><h2>Record</h2><table class=kv>{fields}</table>")
    return page(f"{a.type} from {a.device_id}", body, s, here="/alerts")


def fleet_page(units: Sequence[dict[str, Any]], s: Session, now: float) -> str:
    rows = []
    for u in units:
        h = u["health"] or {}
        silent = u["status"] != "online" or not u["last_seen"] or now - u["last_seen"] > SILENT_AFTER_S
        drivers = h.get("drivers") or {}
        dtext = ", ".join(f"{e(r)} {'up' if d.get('up') else 'DOWN'}"
                          + (f" ({d.get('faults')} faults)" if d.get("faults") else "")
                          for r, d in drivers.items() if isinstance(d, dict))
        down = any(isinstance(d, dict) and not d.get("up") for d in drivers.values())
        models = ", ".join(f"{e(k)} {e(v)}" for k, v in (h.get("models") or {}).items())
        oldest = h.get("oldest_unsent_age_s")
        rows.append(f'<tr class="{"silent" if silent else "ok"}{" down" if down else ""}" data-device="'
                    f'{e(u["device_id"])}"><td>{e(u["device_id"])}</td><td>{e(u["unit_type"])}</td>'
                    f'<td>{e(u["site"])}</td><td>{e(u["status"] or "never heard")}</td><td>{age(u["last_seen"], now)}'
                    f'</td><td>{e(h.get("outbox_pending", "-"))}</td><td>{"-" if oldest is None else f"{oldest:.0f} s"}'
                    f"</td><td>{dtext or '-'}</td><td>{models or '-'}</td><td>{e(str(h.get('config_hash', ''))[:12])}"
                    f"</td><td>{e(h.get('agent_version', '-'))}</td></tr>")
    body = ("<table id=fleet><thead><tr><th>unit</th><th>type</th><th>site</th><th>status</th><th>last seen</th>"
            "<th>backlog</th><th>oldest unsent</th><th>drivers</th><th>models</th><th>config</th><th>agent</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>"
            f"<p class=note>Units offline, never heard or silent for more than {SILENT_AFTER_S:.0f} s are marked.</p>")
    return page("Fleet", body, s, here="/fleet")


def _est(x: Any) -> str:
    if not isinstance(x, dict) or not isinstance(x.get("value"), (int, float)):
        return "-"
    return f"{x['value']:.2f} ± {num(x.get('u95')):.2f}"


def line_svg(points: Sequence[tuple[float, float]], *, label: str, width: int = 480, height: int = 140) -> str:
    if len(points) < 2:
        return f"<p class=empty>{e(label)}: not enough points for a plot.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    sx = (width - 50) / ((x1 - x0) or 1)
    sy = (height - 30) / (y1 - y0)
    path = " ".join(f"{45 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in points)
    return (f'<svg class=plot viewBox="0 0 {width} {height}" width="{width}" height="{height}" role=img '
            f'aria-label="{e(label)}"><polyline fill=none stroke="#1f6feb" stroke-width="1.5" points="{path}"/>'
            f'<text x="2" y="12">{y1:.2f}</text><text x="2" y="{height - 20}">{y0:.2f}</text>'
            f'<text x="{width // 2 - 60}" y="{height - 4}">{e(label)}</text></svg>')


def lots_page(lots: Sequence[AlertRow], series: dict[str, list[tuple[float, float]]], s: Session) -> str:
    rows = []
    for r in lots:
        p = r.payload
        m, limit = p.get("moisture"), p.get("moisture_limit_pct")
        margin = (f"{limit - m['value']:.2f}" if isinstance(m, dict) and isinstance(m.get("value"), (int, float))
                  and isinstance(limit, (int, float)) else "-")
        flags = ", ".join(map(str, as_list(p.get("flags")))) or "-"
        rad = f"gamma {p.get('gamma_alarms', 0)}, neutron {p.get('neutron_alarms', 0)}"
        lot = str(p.get("lot_id"))
        rows.append(f'<tr class="decision-{e(p.get("decision"))}"><td>{e(lot)}</td><td>{e(r.device_id)}</td>'
                    f'<td>{when(r.ts)}</td><td><b>{e(p.get("decision"))}</b></td><td>'
                    f'{e("; ".join(map(str, as_list(p.get("reasons")))))}</td><td>{_est(p.get("fe"))}</td>'
                    f'<td>{_est(p.get("sio2"))}</td><td>{_est(m)}</td><td>{margin}</td>'
                    f'<td>{e(p.get("increments"))}</td><td>{e(rad)}</td><td>{e(p.get("foreign_matter", 0))}</td>'
                    f"<td>{e(flags)}</td></tr>"
                    + (f'<tr class=plotrow><td colspan=13>{line_svg(series[lot], label=f"Fe % along lot {lot} (t)")}'
                       "</td></tr>" if lot in series else ""))
    body = ("<table id=lots><thead><tr><th>lot</th><th>station</th><th>closed</th><th>decision</th><th>reasons</th>"
            "<th>Fe %</th><th>SiO2 %</th><th>moisture %</th><th>margin to TML limit</th><th>increments</th>"
            "<th>radiation alarms</th><th>foreign matter</th><th>flags</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>" + ("" if rows else "<p class=empty>No lot closed yet.</p>"))
    return page("Ore lots", body, s, here="/lots")


LaneHours = dict[str, dict[int, dict[str, int]]]


def lane_hours(summaries: Iterable[AlertRow], confirmations: Iterable[AlertRow]) -> LaneHours:
    """Per lane (a gate unit), per hour on the unit's clock: screened, alarms, confirmed fevers."""
    out: LaneHours = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for r in summaries:
        h = out[r.device_id][int(r.ts // 3600)]
        h["screened"] += int(num(r.payload.get("screened")))
        h["alarms"] += int(num(r.payload.get("alerts")))
    for r in confirmations:
        h = out[r.device_id][int(r.ts // 3600)]
        h["confirmations"] += 1
        h["confirmed"] += 1 if r.payload.get("confirmed") else 0
    return out


def lanes_page(hours: LaneHours, s: Session) -> str:
    parts = []
    for lane, by_hour in sorted(hours.items()):
        rows, rate, conf = [], [], []
        for hour in sorted(by_hour):
            h = by_hour[hour]
            n = h.get("screened", 0)
            alarm = h.get("alarms", 0) / n if n else 0.0
            confirmed = h.get("confirmed", 0) / n if n else 0.0
            rate.append((hour, 100 * alarm))
            conf.append((hour, 100 * confirmed))
            rows.append(f"<tr><td>{time.strftime('%Y-%m-%d %H:00', time.localtime(hour * 3600))}</td><td>{n}</td>"
                        f"<td>{h.get('alarms', 0)}</td><td>{100 * alarm:.2f} %</td><td>{h.get('confirmed', 0)} of "
                        f"{h.get('confirmations', 0)}</td><td>{100 * confirmed:.2f} %</td></tr>")
        parts.append(f'<section class=lane data-lane="{e(lane)}"><h2>{e(lane)}</h2>'
                     + line_svg(rate, label="alarm rate % per hour")
                     + line_svg(conf, label="confirmed fever % per hour")
                     + "<table><thead><tr><th>hour</th><th>screened</th><th>alarms</th><th>alarm rate</th>"
                     "<th>confirmed / confirmations</th><th>confirmed rate</th></tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table></section>")
    return page("Gate lanes", "".join(parts) or "<p class=empty>No lane summaries yet.</p>", s, here="/lanes")


def audit_page(actions: Sequence[Action], proven: int, bad: int | None, s: Session) -> str:
    check = (f"<p class=ok>Chain intact: {proven} entries proven.</p>" if bad is None else
             f"<p class=bad>The audit trail was altered at entry {bad} ({proven} entries before it proven).</p>")
    rows = "".join(f"<tr><td>{x.id}</td><td>{when(x.at)}</td><td>{e(x.user)}</td><td>{e(x.role)}</td>"
                   f"<td>{e(x.action)}</td><td>{e(x.device_id or '')}{'' if x.seq is None else f' seq {x.seq}'}</td>"
                   f"<td>{e(x.detail)}</td></tr>" for x in actions)
    return page("Audit trail", check + "<table id=audit><thead><tr><th>#</th><th>when</th><th>user</th><th>role</th>"
                "<th>action</th><th>record</th><th>detail</th></tr></thead><tbody>" + rows + "</tbody></table>",
                s, here="/audit")


def login_page(error: str, pre: str, nxt: str) -> str:
    msg = f"<p class=bad>{e(error)}</p>" if error else ""
    return page("Log in", f'{msg}<form method=post action="/login" class=login><input type=hidden name=pre '
                f'value="{e(pre)}"><input type=hidden name=next value="{e(nxt)}"><label>User <input name=user '
                'id=user autocomplete=username required></label><label>Password <input name=password id=password '
                'type=password autocomplete=current-password required></label><button id=login>Log in</button></form>',
                None)


def inspect_page(units: Sequence[dict[str, Any]], s: Session, connected: bool | None) -> str:
    if connected is None:
        return page("Remote inspection", "<p class=bad>Remote inspection needs the broker: start the console with"
                    " --broker HOST:PORT (and an operator certificate where the broker asks for one).</p>", s,
                    here="/inspect")
    csrf = f'<input type="hidden" name="csrf" value="{e(s.csrf)}">'
    opts = "".join(f'<option value="{n}">{n} s</option>' for n in INSPECT_SECONDS)
    rows = []
    for u in units:
        act = (f'<form method=post action="/inspect/{quote(u["device_id"], safe="")}" class=act>{csrf}'
               f'<select name=seconds>{opts}</select><button>Inspect</button></form>') if s.may("act") else "-"
        rows.append(f'<tr data-device="{e(u["device_id"])}"><td>{e(u["device_id"])}</td><td>{e(u["unit_type"])}</td>'
                    f'<td>{e(u["site"])}</td><td>{e(u["status"] or "never heard")}</td><td>{act}</td></tr>')
    note = "" if connected else "<p class=bad>The console is not connected to the broker right now.</p>"
    return page("Remote inspection", note + "<p>A unit with a camera or a thermal array sends snapshots (2 per"
                " second) for the time asked, and nothing otherwise. Every request is in the audit trail.</p>"
                "<table id=units><thead><tr><th>unit</th><th>type</th><th>site</th><th>status</th><th></th></tr>"
                "</thead><tbody>" + "".join(rows) + "</tbody></table>", s, here="/inspect")


def view_page(device_id: str, s: Session) -> str:
    dev = quote(device_id, safe="")
    return page(f"Remote inspection: {device_id}",
                f'<p id=view-state>Waiting for the first snapshot…</p><img id=snap alt="" data-device="{e(dev)}"'
                ' data-events="/events/snapshot/' + e(dev) + '" width=640>', s, here="/inspect")


LABEL_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a folder name in the exported training set


def review_page(items: Sequence[tuple[AlertRow, Action | None]], known: Sequence[str], s: Session) -> str:
    csrf = f'<input type="hidden" name="csrf" value="{e(s.csrf)}">'
    cards = []
    for r, done in items:
        p = r.payload
        top = ", ".join(f"{e(t[0])} {float(t[1]):.2f}" for t in as_list(p.get("top3"))[:3]
                        if isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)
                        and isinstance(t[1], (int, float)))
        said = e(p.get("label") or f"abstained: {p.get('abstain_reason')}")
        flag = " ALERT" if p.get("alert") else ""
        photo = p.get("photo")
        img = (f'<img src="/photo/{e(photo)}.jpg" alt="specimen photo" width=320>' if isinstance(photo, str)
               else "<p class=empty>no photo kept</p>")
        status = (f"<p class=ok>reviewed: <b>{e(done.detail)}</b> by {e(done.user)}, {when(done.at)}</p>"
                  if done else "<p>not reviewed</p>")
        form = ""
        if s.may("act"):
            opts = "".join(f'<option value="{e(v)}"{" selected" if v == p.get("label") else ""}>{e(v)}</option>'
                           for v in known)
            form = (f'<form method=post action="/review/{quote(r.device_id, safe="")}/{r.seq}" class=act>{csrf}'
                    f'<label>Label <select name=label>{opts}</select></label>'
                    '<label>or another <input name=other maxlength=64 placeholder="genus_species"></label>'
                    "<button>Save label</button></form>")
        cards.append(f'<section class=review data-key="{e(r.device_id)}/{r.seq}"><h2>{e(p.get("model"))}: '
                     f"{said}{flag}</h2><p>{e(r.device_id)} seq {r.seq}, {when(r.ts)}; top-3: {top or '-'}; "
                     f"CITES {e(p.get('cites') or '-')}; quarantine pest {'yes' if p.get('quarantine_pest') else 'no'}"
                     f"</p>{img}{status}{form}</section>")
    body = ("<p>A specialist confirms or corrects each identification; `customs-edge console export-labels DIR` writes"
            " the reviewed photos as DIR/&lt;label&gt;/*.jpg for retraining.</p>" + "".join(cards)
            + ("" if cards else "<p class=empty>No identifications yet.</p>"))
    return page("Image review", body, s, here="/review")
