"use strict";
// The fleet page: one EventSource on /events keeps `devices` current (the server pushes
// every change); the only timer redraws ages once a second. Everything shown is built
// with the DOM API and textContent, never markup from the data.
(function () {
  const $ = (id) => document.getElementById(id);
  const devices = new Map(); // prefix -> device object from the server
  const local = new Map(); // prefix -> {command, state, message} for POSTs from this page
  let hello = { allow_commands: false, attention_after_s: 3600 };
  let broker = { connected: false, error: null };
  let offset = 0; // server clock minus ours, ms
  let confirming = null; // {prefix, command}
  let events = 0;
  const TOKEN_KEY = "fieldsync-fleet-token";
  // One id per loaded document: tests read it before and after a change to prove the
  // page was updated in place, not reloaded.
  document.documentElement.dataset.loadId = Math.random().toString(36).slice(2);

  const now = () => Date.now() + offset;
  const clock = (t) => {
    if (t) offset = Date.parse(t) - Date.now();
  };
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const age = (s) => {
    if (s === null || s === undefined || isNaN(s)) return "-";
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600),
      m = Math.floor((s % 3600) / 60), r = s % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + r + "s";
    return r + "s";
  };
  const since = (t) => (t ? age((now() - Date.parse(t)) / 1000) : "-");
  const bytes = (b) => {
    if (b === null || b === undefined) return "-";
    if (b < 1e3) return b + " B";
    if (b < 1e6) return (b / 1e3).toFixed(1) + " kB";
    if (b < 1e9) return (b / 1e6).toFixed(1) + " MB";
    return (b / 1e9).toFixed(2) + " GB";
  };
  const pending = (d) => (d.pending && d.pending.count != null ? d.pending.count : null);
  // A pending photo keeps ageing after the snapshot that reported it.
  const oldest = (d) => {
    if (!d.pending || d.pending.oldest_age_s == null) return null;
    const extra = d.status_received ? (now() - Date.parse(d.status_received)) / 1000 : 0;
    return d.pending.oldest_age_s + Math.max(0, extra);
  };
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  // ---- the event stream ----
  const es = new EventSource("/events");
  es.onopen = () => {
    $("stream").textContent = "live";
    $("stream").className = "pill ok";
  };
  es.onerror = () => {
    $("stream").textContent = "page: reconnecting…";
    $("stream").className = "pill bad";
  };
  es.addEventListener("hello", (e) => {
    hello = JSON.parse(e.data);
    $("token-box").hidden = !hello.allow_commands;
    tokenState();
    schedule();
  });
  es.addEventListener("snapshot", (e) => {
    const s = JSON.parse(e.data);
    clock(s.server_time);
    broker = s.broker;
    devices.clear();
    for (const d of s.devices) devices.set(d.prefix, d);
    events++;
    schedule();
  });
  es.addEventListener("device", (e) => {
    const m = JSON.parse(e.data);
    clock(m.server_time);
    devices.set(m.device.prefix, m.device);
    events++;
    schedule();
  });

  // ---- the operator's token (kept for this tab only) ----
  function tokenState() {
    const has = token() !== "";
    $("token-state").textContent = has ? "token set" : "no token: actions will be refused";
    $("token-forget").hidden = !has;
  }
  $("token-use").onclick = () => {
    const t = $("token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    $("token").value = "";
    tokenState();
  };
  $("token-forget").onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenState();
  };

  // ---- commands ----
  const LABEL = { sync: "Sync now", pause: "Pause", resume: "Resume", retry: "Retry failed" };
  const ASK = {
    sync: "Start uploading now on",
    pause: "Pause uploads on",
    resume: "Resume uploads on",
    retry: "Requeue every failed photo on",
  };
  async function send(prefix, command) {
    local.set(prefix, { command, state: "sending", message: "" });
    schedule();
    try {
      const r = await fetch("/cmd", {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() },
        body: JSON.stringify({ device: prefix, command }),
      });
      const body = await r.json().catch(() => ({}));
      if (r.ok) {
        local.set(prefix, { command, state: "sent", message: "", request_id: body.request_id });
      } else {
        local.set(prefix, { command, state: "refused", message: body.error || "HTTP " + r.status });
      }
    } catch (err) {
      local.set(prefix, { command, state: "refused", message: String(err) });
    }
    schedule();
  }

  // ---- rendering ----
  let pendingRender = false;
  function schedule() {
    if (pendingRender) return;
    pendingRender = true;
    setTimeout(() => {
      pendingRender = false;
      render();
    }, 0);
  }

  function matches(d, q) {
    if (!q) return true;
    const hay = [d.device_id, d.prefix, d.state, d.pause_reason, ...(d.attention || []),
      ...((d.checklists || []).map((c) => c.checklist))].join(" ").toLowerCase();
    return q.toLowerCase().split(/\s+/).every((w) => hay.includes(w));
  }

  const SORTS = {
    device: (a, b) => a.device_id.localeCompare(b.device_id),
    state: (a, b) => String(a.state).localeCompare(String(b.state)),
    pending: (a, b) => (pending(b) || 0) - (pending(a) || 0),
    oldest: (a, b) => (oldest(b) || 0) - (oldest(a) || 0),
    failed: (a, b) => (b.failed || 0) - (a.failed || 0),
    last_upload: (a, b) => {
      const t = (d) => (d.last_success && d.last_success.time ? Date.parse(d.last_success.time) : 0);
      return t(a) - t(b);
    },
  };

  function sparkline(d) {
    const W = 120, H = 24, NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    const h = d.history || [];
    const end = now() / 1000, start = end - 3600;
    const max = Math.max(1, ...h.map((p) => p[1]));
    const x = (t) => (Math.max(0, t - start) / 3600) * (W - 6) + 1;
    const y = (n) => H - 2 - (n / max) * (H - 4);
    const pts = h.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
    if (h.length) pts.push(x(end).toFixed(1) + "," + y(h[h.length - 1][1]).toFixed(1));
    const base = document.createElementNS(NS, "line");
    base.setAttribute("x1", 1);
    base.setAttribute("x2", W - 1);
    base.setAttribute("y1", H - 1.5);
    base.setAttribute("y2", H - 1.5);
    svg.appendChild(base);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts.join(" "));
    svg.appendChild(line);
    if (h.length) {
      // The value now, visible even when the history is only seconds long.
      const dot = document.createElementNS(NS, "circle");
      dot.setAttribute("cx", x(end).toFixed(1));
      dot.setAttribute("cy", y(h[h.length - 1][1]).toFixed(1));
      dot.setAttribute("r", 2);
      svg.appendChild(dot);
    }
    const title = document.createElementNS(NS, "title");
    const lo = h.length ? Math.min(...h.map((p) => p[1])) : 0;
    title.textContent = "pending over the last hour: " + (h.length ? lo + "–" + Math.max(...h.map((p) => p[1])) : "no data");
    svg.appendChild(title);
    return svg;
  }

  function transfers(d) {
    const td = el("td", "transfers");
    const list = [];
    for (const u of d.uploading || []) list.push(["↑", u]);
    for (const u of d.downloading || []) list.push(["↓", u]);
    if (!list.length) td.textContent = "-";
    for (const [arrow, u] of list) {
      const row = el("div", "transfer");
      row.dataset.percent = u.percent;
      row.appendChild(el("span", "", arrow + " " + (u.filename || u.id) + " " + (u.percent != null ? u.percent : "?") + "%"));
      const bar = el("div", "bar");
      const fill = el("div");
      fill.style.width = Math.max(0, Math.min(100, u.percent || 0)) + "%";
      bar.appendChild(fill);
      row.appendChild(bar);
      td.appendChild(row);
    }
    return td;
  }

  function health(d) {
    const h = d.device;
    if (!h) return el("td", "health", "-");
    const parts = [];
    if (h.uptime_s != null) parts.push("up " + age(h.uptime_s));
    if (h.load_1m != null) parts.push("load " + Number(h.load_1m).toFixed(2));
    if (h.mem_available_bytes != null) parts.push("mem " + bytes(h.mem_available_bytes) + " free of " + bytes(h.mem_total_bytes));
    if (h.rss_bytes != null) parts.push("agent " + bytes(h.rss_bytes) + " RSS");
    if (h.cpu_s != null) parts.push(Number(h.cpu_s).toFixed(1) + " s CPU");
    const td = el("td", "health", parts.join(", "));
    if (d.agent_version) td.appendChild(el("div", "sub", "fieldsync " + d.agent_version));
    return td;
  }

  function checklists(d) {
    const td = el("td", "checklists");
    const cs = d.checklists;
    if (!Array.isArray(cs) || !cs.length) {
      td.textContent = "-";
      return td;
    }
    for (const c of cs) {
      const div = el("div", "checklist");
      div.dataset.checklist = c.checklist;
      const waits = c.waiting_for || [];
      const counts = " (" + c.synced + "/" + c.named + " synced" + (c.failed ? ", " + c.failed + " failed" : "") + ")";
      if (c.published_at && !waits.length) {
        div.classList.add("published");
        div.dataset.published = "true";
        div.textContent = c.checklist + " ✓ published " + since(c.published_at) + " ago" + counts;
      } else {
        div.classList.add("waiting");
        div.dataset.published = "false";
        div.appendChild(el("span", "", c.checklist + counts + " waits for: "));
        const shown = waits.slice(0, 5).map((w) => {
          const why = w.reason === "not_captured" ? "not captured" : w.reason;
          return w.file + " (" + why + (w.detail ? ": " + w.detail : "") + ")";
        });
        if (waits.length > 5) shown.push("and " + (waits.length - 5) + " more");
        div.appendChild(el("span", "waits", shown.join(", ") || "publication"));
      }
      td.appendChild(div);
    }
    return td;
  }

  function result(d) {
    const div = el("div", "result");
    const l = local.get(d.prefix);
    const c = d.command;
    if (l && l.state !== "sent") {
      div.dataset.result = l.state;
      div.className = "result " + (l.state === "refused" ? "result-error" : "");
      div.textContent = l.state === "sending" ? l.command + ": sending…" : l.command + " refused: " + l.message;
      return div;
    }
    if (!c) return div;
    div.dataset.requestId = c.request_id;
    if (c.result) {
      div.dataset.result = c.result;
      div.className = "result result-" + c.result;
      div.textContent = c.command + ": " + c.result + (c.message ? " — " + c.message : "") + " (" + since(c.answered) + " ago)";
    } else {
      div.dataset.result = "waiting";
      div.textContent = c.command + ": sent, waiting for the device… (" + since(c.sent) + ")";
    }
    div.title = "request " + c.request_id;
    return div;
  }

  function actions(d) {
    const td = el("td", "actions");
    if (!hello.allow_commands) {
      td.appendChild(el("span", "sub", "read-only"));
      return td;
    }
    if (confirming && confirming.prefix === d.prefix) {
      const box = el("div", "confirm-box");
      box.appendChild(el("div", "", ASK[confirming.command] + " " + d.device_id + "?"));
      if (!token()) box.appendChild(el("div", "result-error", "Enter the operator token first (top right)."));
      const yes = el("button", "confirm", "Confirm");
      yes.type = "button";
      yes.dataset.confirm = confirming.command;
      const cmd = confirming.command;
      yes.onclick = () => {
        confirming = null;
        send(d.prefix, cmd);
      };
      const no = el("button", "cancel", "Cancel");
      no.type = "button";
      no.onclick = () => {
        confirming = null;
        schedule();
      };
      box.appendChild(yes);
      box.appendChild(no);
      td.appendChild(box);
    } else {
      for (const c of ["sync", "pause", "resume", "retry"]) {
        const b = el("button", "", LABEL[c]);
        b.type = "button";
        b.dataset.action = c;
        b.onclick = () => {
          confirming = { prefix: d.prefix, command: c };
          schedule();
        };
        td.appendChild(b);
      }
    }
    td.appendChild(result(d));
    return td;
  }

  function row(d) {
    const tr = el("tr");
    const attention = d.attention || [];
    tr.dataset.device = d.device_id;
    tr.dataset.prefix = d.prefix;
    tr.dataset.state = d.state || "unknown";
    tr.dataset.pending = pending(d) == null ? "" : pending(d);
    tr.dataset.attention = attention.length ? "true" : "false";
    if (attention.length) tr.classList.add("attention");

    const id = el("td", "device");
    id.appendChild(el("div", "id", d.device_id));
    if (d.prefix !== "fieldsync/" + d.device_id) id.appendChild(el("div", "sub", d.prefix));
    for (const a of attention) id.appendChild(el("span", "badge", a));
    tr.appendChild(id);

    const st = el("td", "state");
    st.appendChild(el("span", "state-" + (d.state || "unknown"), d.state || "unknown"));
    const from = d.state_since || d.status_time;
    st.appendChild(el("div", "sub age", from ? (d.state_since ? "for " + since(from) : "last heard " + since(from) + " ago") : ""));
    tr.appendChild(st);

    const p = el("td", "pending");
    p.appendChild(el("span", "count", pending(d) == null ? "-" : pending(d)));
    if (d.pending && d.pending.count) {
      p.appendChild(el("div", "sub", bytes(d.pending.bytes) + ", oldest " + age(oldest(d))));
    }
    tr.appendChild(p);

    const sp = el("td", "history");
    sp.appendChild(sparkline(d));
    tr.appendChild(sp);
    tr.appendChild(transfers(d));
    tr.appendChild(el("td", "failed", d.failed == null ? "-" : d.failed));
    tr.appendChild(el("td", "paused", d.paused ? d.pause_reason || "paused" : "-"));
    const last = d.last_success;
    const lu = el("td", "last-upload", last && last.time ? since(last.time) + " ago" : "-");
    if (last && last.checklist) lu.appendChild(el("div", "sub", last.checklist + (last.row ? " / " + last.row : "")));
    if (d.last_error && d.last_error.reason) lu.appendChild(el("div", "sub result-error", "last error: " + d.last_error.reason));
    tr.appendChild(lu);
    tr.appendChild(health(d));
    tr.appendChild(checklists(d));
    tr.appendChild(actions(d));
    return tr;
  }

  function render() {
    const b = $("broker");
    b.textContent = broker.connected ? "broker: connected" : "broker: " + (broker.error || "disconnected");
    b.className = "pill " + (broker.connected ? "ok" : "bad");
    const q = $("filter").value.trim();
    const key = $("sort").value;
    const first = $("attention-first").checked;
    const list = [...devices.values()].filter((d) => matches(d, q));
    list.sort((a, c) => {
      if (first) {
        const x = (c.attention || []).length > 0, y = (a.attention || []).length > 0;
        if (x !== y) return x ? 1 : -1;
      }
      return SORTS[key](a, c) || a.device_id.localeCompare(c.device_id);
    });
    const body = $("devices");
    body.replaceChildren(...list.map(row));
    const needing = [...devices.values()].filter((d) => (d.attention || []).length).length;
    $("summary").textContent = devices.size + " devices, " + needing + " need attention" +
      (list.length !== devices.size ? ", " + list.length + " shown" : "");
    $("empty").hidden = devices.size > 0;
    document.body.dataset.events = events;
  }

  for (const id of ["filter", "sort", "attention-first"]) {
    $(id).addEventListener("input", render);
    $(id).addEventListener("change", render);
  }
  // Ages move on without any message: redraw them (no request is made).
  setInterval(render, 1000);
})();
