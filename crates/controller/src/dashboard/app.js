// Coalmine's dashboard: no framework, no build step. Rows and charts are updated in place from
// Server-Sent Events (/api/v1/watch); changes are batched into one render per animation frame,
// so a burst of updates (a thousand rollouts) costs one layout.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // key -> row as the server sends it (key: name, or namespace/name)
  const rowEls = new Map(); // key -> <tr>
  const dirty = new Set();
  let listDirty = false;
  let session = { signedIn: false };
  let detail = null; // the open rollout's page: {key, run, status, points, checks, events, row}
  let detailDirty = false;
  const groups = new Map(); // group name -> its row as the server sends it
  let groupsDirty = false;
  let group = null; // the open group's page: {key, history}
  let groupDirty = false;
  let frame = 0;

  // ---- formatting ----
  const pct = (v) => (v == null ? "–" : (Math.round(v * 100) / 100) + " %");
  const ms = (v) => (v == null ? "–" : (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : Math.round(v)) + " ms");
  function age(fromMs, toMs) {
    let s = Math.max(0, Math.round(((toMs || Date.now()) - fromMs) / 1000));
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60); s %= 60;
    if (m < 60) return m + " min " + s + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }
  const clock = (t) => new Date(t).toLocaleTimeString();
  function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function notice(text) {
    const n = $("notice");
    n.hidden = !text;
    n.textContent = text || "";
  }

  // ---- the list ----
  function schedule() { if (!frame) frame = requestAnimationFrame(render); }
  function applyChange(c) {
    if (c.type === "group") {
      groups.set(c.key, c.row); groupsDirty = true;
      if (group && group.key === c.key) groupDirty = true;
    } else if (c.type === "groupDeleted") {
      groups.delete(c.key); groupsDirty = true;
    } else if (c.type === "deleted") {
      rows.delete(c.key); dirty.add(c.key);
    } else {
      // A member's events go on its open group's history as they come.
      if (group && c.row && c.row.group === group.key) {
        for (const e of c.events || []) (group.history || group.early).push(e);
        if ((c.events || []).length) groupDirty = true;
      }
      rows.set(c.key, c.row); dirty.add(c.key);
      if (detail && detail.key === c.key) {
        if (c.run !== detail.run) { openDetail(c.key); return; }
        if (c.point) detail.points.push(c.point);
        for (const e of c.events || []) detail.events.push(e);
        detail.row = c.row;
        detailDirty = true;
        // The status (the judges' evidence) and, where a change carries none, the events are
        // read again, at most once a second.
        refreshSoon(!(c.events && c.events.length));
      }
    }
    schedule();
  }
  function rowCells(tr) {
    if (tr.cells.length) return tr.cells;
    const link = el("a", {});
    const name = el("td"); name.appendChild(link);
    const phase = el("td"); phase.appendChild(el("span", { class: "phase" }));
    const weight = el("td", { class: "num" }); weight.appendChild(el("span", { class: "bar", "aria-hidden": "true" })).appendChild(el("span")); weight.appendChild(el("span"));
    tr.append(name, el("td"), phase, weight, el("td", { class: "num" }), el("td", { class: "wide" }));
    return tr.cells;
  }
  function renderRow(key) {
    const r = rows.get(key);
    let tr = rowEls.get(key);
    if (!r) { if (tr) { tr.remove(); rowEls.delete(key); listDirty = true; } return; }
    if (!tr) { tr = el("tr", { "data-key": key }); rowEls.set(key, tr); listDirty = true; }
    const c = rowCells(tr);
    const a = c[0].firstChild;
    setText(a, key);
    const href = "#/rollouts/" + encodeURIComponent(key);
    if (a.getAttribute("href") !== href) a.setAttribute("href", href);
    setText(c[1], (r.service || "") + (r.group ? " (group " + r.group + ")" : ""));
    const badge = c[2].firstChild;
    const phase = (r.phase || "Unknown") + (r.paused ? " (paused)" : "");
    setText(badge, phase);
    if (badge.className !== "phase " + r.phase) badge.className = "phase " + r.phase;
    const w = r.canaryWeight == null ? null : r.canaryWeight;
    c[3].firstChild.firstChild.style.width = (w || 0) + "%";
    setText(c[3].lastChild, pct(w));
    setText(c[4], r.startedMs ? age(r.startedMs, r.endedMs) : "");
    // Holding (its state cannot be saved) matters more than the last event, which came before.
    setText(c[5], r.held || r.lastEvent || "");
  }
  function render() {
    frame = 0;
    for (const name of dirty) renderRow(name);
    dirty.clear();
    if (listDirty) {
      // A group's members side by side.
      const sortKey = (n) => ((rows.get(n) || {}).group || "") + "\u0000" + n;
      const names = [...rowEls.keys()].sort((a, b) => (sortKey(a) < sortKey(b) ? -1 : sortKey(a) > sortKey(b) ? 1 : 0));
      const body = $("rows");
      names.forEach((n, i) => { const tr = rowEls.get(n); if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null); });
      listDirty = false;
    }
    $("empty").hidden = rows.size > 0;
    if (groupsDirty) { groupsDirty = false; renderGroups(); }
    if (detail && detailDirty) { detailDirty = false; renderDetail(); }
    if (group && groupDirty) { groupDirty = false; renderGroup(); }
  }
  // Running clocks ("how long") tick locally; nothing is fetched for them.
  setInterval(() => {
    for (const [name, r] of rows) if (!r.endedMs) dirty.add(name);
    if (detail) detailDirty = true;
    schedule();
  }, 1000);

  // ---- live updates ----
  let source = null;
  function connect() {
    source = new EventSource("/api/v1/watch");
    source.addEventListener("snapshot", (m) => {
      const data = JSON.parse(m.data);
      const seen = new Set();
      for (const r of data.rows) { rows.set(r.key, r); dirty.add(r.key); seen.add(r.key); }
      for (const key of [...rows.keys()]) if (!seen.has(key)) { rows.delete(key); dirty.add(key); }
      groups.clear();
      for (const g of data.groups || []) groups.set(g.key, g);
      groupsDirty = true; groupDirty = true;
      setText($("connection"), "live");
      schedule();
    });
    source.addEventListener("change", (m) => applyChange(JSON.parse(m.data)));
    source.onerror = () => setText($("connection"), "reconnecting…");
    source.onopen = () => setText($("connection"), "live");
  }

  // ---- groups: each shown as one release ----
  function gateWords(g) {
    if (!g) return "–";
    if (!g.start) return "closed";
    if (g.promote) return "open";
    return "up to " + pct(g.maxWeight);
  }
  function phaseBadge(phase) { return el("span", { class: "phase " + phase }, phase || "Unknown"); }
  function weightCell(w) {
    const td = el("td", { class: "num" });
    td.appendChild(el("span", { class: "bar", "aria-hidden": "true" })).appendChild(el("span")).style.width = (w || 0) + "%";
    td.append(pct(w));
    return td;
  }
  // Rows kept and changed in place, like the rollouts' (a link being clicked stays the same).
  const groupEls = new Map(); // group name -> <tr>
  function renderGroups() {
    const names = [...groups.keys()].sort();
    $("groups").hidden = !names.length;
    for (const [n, tr] of groupEls) if (!groups.has(n)) { tr.remove(); groupEls.delete(n); }
    const body = $("group-rows");
    names.forEach((n, i) => {
      const g = groups.get(n);
      let tr = groupEls.get(n);
      if (!tr) {
        tr = el("tr", { "data-key": n });
        const name = el("td");
        name.appendChild(el("a", { href: "#/groups/" + encodeURIComponent(n) }, n));
        const phase = el("td");
        phase.appendChild(el("span"));
        tr.append(name, el("td"), phase, el("td"), el("td", { class: "wide" }));
        groupEls.set(n, tr);
      }
      const c = tr.cells;
      setText(c[1], g.policy || "");
      const badge = c[2].firstChild;
      setText(badge, g.phase || "Unknown");
      if (badge.className !== "phase " + g.phase) badge.className = "phase " + g.phase;
      setText(c[3], (g.members || []).map((m) => m.name + " " + pct(m.canaryWeight)).join(", "));
      setText(c[4], g.reason || "");
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
  }
  async function openGroup(key) {
    // Events that come while the history is read are added to it, unless it has them.
    group = { key, history: null, early: [] };
    groupDirty = true; schedule();
    const r = await fetch("/api/v1/groups/" + encodeURIComponent(key) + "/history");
    if (!r.ok) { notice((await r.json().catch(() => ({}))).error || "cannot read group " + key); location.hash = "#/"; return; }
    const history = await r.json();
    if (!group || group.key !== key) return;
    const same = (a, b) => a.time === b.time && a.rollout === b.rollout && a.message === b.message;
    group.history = history.concat(group.early.filter((e) => !history.some((h) => same(h, e))));
    groupDirty = true; schedule();
  }
  function renderGroup() {
    const g = groups.get(group.key);
    setText($("group-title"), group.key);
    if (!g) { setText($("g-phase"), "–"); return; }
    setText($("g-phase"), g.phase);
    setText($("g-policy"), g.policy === "order" ? "in order" : "together (lock-step)");
    setText($("g-count"), (g.members || []).length + "");
    const reason = $("g-reason");
    reason.hidden = !g.reason;
    setText(reason, g.reason || "");
    $("g-members").replaceChildren(...(g.members || []).map((m) => {
      const name = el("th", { scope: "row" });
      name.appendChild(el("a", { href: "#/rollouts/" + encodeURIComponent(m.name) }, m.name));
      const phase = el("td");
      phase.appendChild(phaseBadge(m.phase));
      if (m.paused) phase.append(" (paused)");
      const gate = el("td", {}, gateWords(m.gate));
      if (m.gate && m.gate.waitingFor) gate.title = "waiting for " + m.gate.waitingFor;
      const tr = el("tr", { "data-member": m.name });
      tr.append(name, phase, weightCell(m.canaryWeight), gate, el("td", { class: "wide" }, m.message || ""));
      return tr;
    }));
    const history = group.history || [];
    const ol = $("g-history");
    if (ol.childElementCount === history.length && ol.dataset.key === group.key) return;
    ol.dataset.key = group.key;
    ol.replaceChildren(...history.slice().reverse().map((e) => {
      const li = el("li", { class: e.level });
      li.appendChild(el("time", { datetime: e.time }, new Date(e.time).toLocaleTimeString()));
      li.append(`${e.rollout}: ${e.message} (${e.phase}, ${pct(e.canaryWeight)})`);
      return li;
    }));
  }

  // ---- one rollout ----
  let refreshTimer = 0, refreshEvents = false;
  function refreshSoon(events) {
    refreshEvents = refreshEvents || events;
    if (refreshTimer) return;
    refreshTimer = setTimeout(async () => {
      refreshTimer = 0;
      if (!detail) return;
      const key = detail.key, withEvents = refreshEvents;
      refreshEvents = false;
      const r = await fetch("/api/v1/rollouts/" + encodeURIComponent(key) + "/live?points=false");
      if (!r.ok || !detail || detail.key !== key) return;
      const d = await r.json();
      detail.status = d.status; detail.checks = d.checks;
      if (withEvents) detail.events = d.events;
      detailDirty = true; schedule();
    }, 1000);
  }
  async function openDetail(key) {
    const r = await fetch("/api/v1/rollouts/" + encodeURIComponent(key) + "/live");
    if (!r.ok) { notice((await r.json().catch(() => ({}))).error || "cannot read " + key); location.hash = "#/"; return; }
    const d = await r.json();
    detail = { key, run: d.run, status: d.status, points: d.points || [], checks: d.checks, events: d.events, row: rows.get(key) };
    setText($("document"), d.document);
    setText($("d-service"), d.service + (d.group ? " (group " + d.group + ": its members move as one)" : ""));
    detailDirty = true;
    schedule();
  }
  function renderDetail() {
    const d = detail, s = d.status, row = d.row || {};
    setText($("detail-title"), d.key);
    const phase = row.phase || s.phase;
    setText($("d-phase"), phase + (row.paused || s.paused ? " (paused)" : ""));
    setText($("d-weight"), pct(row.canaryWeight != null ? row.canaryWeight : s.canaryWeight));
    const started = row.startedMs || Date.parse(s.startedAt);
    setText($("d-age"), age(started, row.endedMs || (s.outcome ? Date.parse(s.lastTransitionTime) : null)));
    // The newest event says what is happening now (a rollback is a warning, not the status's
    // last info message).
    setText($("d-message"), row.held || row.lastEvent || s.message || "");
    const finished = phase === "Succeeded" || phase === "Failed";
    for (const b of $("actions").querySelectorAll("button")) b.disabled = finished;
    const paused = row.paused != null ? row.paused : s.paused;
    $("actions").querySelector("[data-command=pause]").hidden = paused;
    $("actions").querySelector("[data-command=resume]").hidden = !paused;
    charts(d);
    explain(s);
    checks(d);
    events(d);
  }

  // ---- charts: a few hand-drawn SVG lines, no library ----
  const W = 600, H = 160, PAD = 28;
  function svgEl(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function chart(id, label, series, opts) {
    const box = $(id);
    const all = series.flatMap((s) => s.points.concat(s.band ? s.band.flatMap((b) => [[b[0], b[1]], [b[0], b[2]]]) : []));
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, preserveAspectRatio: "none" });
    svg.appendChild(svgEl("title", {})).textContent = label;
    if (!all.length) {
      const t = svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }); t.textContent = "no data yet";
      svg.appendChild(t); box.replaceChildren(svg); return;
    }
    const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]), t0 + 1000);
    let y0 = opts.min != null ? opts.min : Math.min(...all.map((p) => p[1]));
    let y1 = opts.max != null ? opts.max : Math.max(...all.map((p) => p[1]));
    if (opts.floor != null) y1 = Math.max(y1, opts.floor);
    if (y1 <= y0) y1 = y0 + 1;
    const x = (t) => PAD + ((t - t0) / (t1 - t0)) * (W - PAD - 6);
    const y = (v) => H - 16 - ((v - y0) / (y1 - y0)) * (H - 24);
    svg.appendChild(svgEl("line", { class: "axis", x1: PAD, y1: H - 16, x2: W, y2: H - 16 }));
    for (const [v, txt] of [[y0, fmt(y0)], [y1, fmt(y1)]]) {
      const t = svgEl("text", { x: 2, y: y(v) + 4 }); t.textContent = txt; svg.appendChild(t);
    }
    const tl = svgEl("text", { x: PAD, y: H - 3 }); tl.textContent = clock(t0); svg.appendChild(tl);
    const tr = svgEl("text", { x: W - 4, y: H - 3, "text-anchor": "end" }); tr.textContent = clock(t1); svg.appendChild(tr);
    for (const s of series) {
      if (s.band && s.band.length) {
        const up = s.band.map((b) => `${x(b[0])},${y(b[2])}`), down = s.band.map((b) => `${x(b[0])},${y(b[1])}`).reverse();
        svg.appendChild(svgEl("polygon", { points: up.concat(down).join(" "), fill: s.color, "fill-opacity": "0.12", stroke: "none" }));
      }
      if (!s.points.length) continue;
      let d = "";
      s.points.forEach((p, i) => {
        if (s.step && i) d += `H${x(p[0])}V${y(p[1])}`;
        else d += (i ? "L" : "M") + x(p[0]) + "," + y(p[1]);
      });
      svg.appendChild(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || "none" }));
    }
    box.replaceChildren(svg);
  }
  function fmt(v) { return Math.abs(v) >= 100 ? Math.round(v) + "" : (Math.round(v * 100) / 100) + ""; }
  const CANARY = "#b3261e", STABLE = "#0b57d0";

  function charts(d) {
    const pts = d.points;
    chart("chart-weight", "Canary weight over time", [{ color: CANARY, step: true, points: pts.map((p) => [p.t, p.weight]) }], { min: 0, max: 100 });
    // Failure rate per version over a 10 s window, from the judges' running totals.
    const withTotals = pts.filter((p) => p.totals);
    const canary = [], stable = [];
    let j = 0;
    for (let i = 0; i < withTotals.length; i++) {
      const p = withTotals[i];
      while (withTotals[j].t < p.t - 10000) j++;
      const q = j < i ? withTotals[j] : null;
      const base = q ? q.totals : [0, 0, 0, 0];
      const [cr, cf, sr, sf] = p.totals.map((v, k) => v - base[k]);
      if (cr > 0) canary.push([p.t, (100 * cf) / cr]);
      if (sr > 0) stable.push([p.t, (100 * sf) / sr]);
    }
    chart("chart-errors", "Failure rate of canary and stable over time", [
      { color: STABLE, points: stable }, { color: CANARY, points: canary }], { min: 0, floor: 1 });
    const seq = d.status.sequential;
    const bound = seq ? Math.log10(1 / seq.errors.alpha) : null;
    const bf = pts.filter((p) => p.logBayesFactor != null).map((p) => [p.t, p.logBayesFactor / Math.LN10]);
    const boundLine = bound != null && bf.length ? [[bf[0][0], bound], [bf[bf.length - 1][0], bound]] : [];
    chart("chart-bayes", "Bayes factor against the rollback bound", [
      { color: "#555", dash: "4 3", points: boundLine }, { color: CANARY, points: bf }], { floor: bound != null ? bound + 0.5 : 1 });
    const lat = [];
    const qs = pts.length ? (pts[pts.length - 1].quantiles || []).map((q) => q[0]) : [];
    qs.forEach((quantile, k) => {
      const of = (i) => pts.filter((p) => p.quantiles && p.quantiles[k] && p.quantiles[k][i] != null);
      lat.push({ color: STABLE, dash: k ? "5 3" : "none", points: of(2).map((p) => [p.t, p.quantiles[k][2]]),
        band: of(5).filter((p) => p.quantiles[k][6] != null).map((p) => [p.t, p.quantiles[k][5], p.quantiles[k][6]]) });
      lat.push({ color: CANARY, dash: k ? "5 3" : "none", points: of(1).map((p) => [p.t, p.quantiles[k][1]]),
        band: of(3).filter((p) => p.quantiles[k][4] != null).map((p) => [p.t, p.quantiles[k][3], p.quantiles[k][4]]) });
    });
    chart("chart-latency", "Latency quantiles of canary and stable over time", lat, { min: 0 });
  }

  // ---- the judges' evidence, one sentence each ----
  function explain(s) {
    const seq = s.sequential;
    if (!seq) {
      setText($("judge-errors"), "The sequential judges start with the canary's first analysed requests.");
      setText($("judge-latency"), "");
      return;
    }
    const e = seq.errors;
    const bf = Math.exp(e.logBayesFactor), bound = 1 / e.alpha;
    setText($("judge-errors"),
      `Errors: the canary failed ${e.canaryFailures} of ${e.canaryRequests} requests (${pct(e.canaryFailureRate == null ? null : 100 * e.canaryFailureRate)}) and stable ${e.stableFailures} of ${e.stableRequests} (${pct(e.stableFailureRate == null ? null : 100 * e.stableFailureRate)}); ` +
      `the Bayes factor for "the canary fails more often" is ${bf < 1000 ? bf.toPrecision(3) : bf.toExponential(2)}, and Coalmine rolls back when it reaches ${Math.round(bound)} ` +
      `(so a good canary is rolled back by chance at most ${(e.alpha * 100).toPrecision(2)} % of the time)` + (e.rejected ? ": reached, the canary fails more often." : "."));
    const l = seq.latency;
    const parts = (l.quantiles || []).map((q) => {
      const name = "p" + (Math.round(q.quantile * 1000) / 10);
      return `${name} canary ${ms(q.canaryMs)} (between ${ms(q.canaryLowerMs)} and ${ms(q.canaryUpperMs)}), stable ${ms(q.stableMs)} (between ${ms(q.stableLowerMs)} and ${ms(q.stableUpperMs)})`;
    });
    setText($("judge-latency"),
      `Latency: ${parts.join("; ") || "not enough requests yet"}. The bands hold at all times with ${(100 - l.alpha * 100).toPrecision(3)} % confidence; ` +
      `a regression is declared only when the canary's lower bound exceeds stable's upper bound by more than ${Math.round(l.tolerance * 100)} % and ${l.minDifferenceMs} ms` +
      (l.rejected ? ": declared." : "."));
  }

  function checks(d) {
    const body = $("checks");
    const readings = new Map();
    for (const p of d.points) for (const [name, value, verdict] of p.readings || []) {
      if (!readings.has(name)) readings.set(name, []);
      readings.get(name).push([p.t, value, verdict]);
    }
    const last = new Map((d.status.metrics || []).map((m) => [m.name, m]));
    const trs = d.checks.map((c) => {
      const m = last.get(c.name) || {};
      const range = c.min != null && c.max != null ? `${c.min} – ${c.max}` : c.min != null ? `≥ ${c.min}` : c.max != null ? `≤ ${c.max}` : "none";
      const tr = el("tr");
      tr.append(el("th", { scope: "row" }, c.name), el("td", { class: "num" }, range),
        el("td", { class: "num" }, m.value == null ? (m.reason || "–") : fmt(m.value)), el("td", {}, m.verdict || "–"));
      const list = readings.get(c.name) || [];
      const cell = el("td");
      if (list.length) {
        const det = el("details", { class: "readings" });
        det.appendChild(el("summary", {}, list.length + " readings"));
        const ol = el("ol");
        for (const [t, v, verdict] of list) ol.appendChild(el("li", {}, `${clock(t)}: ${v == null ? "no value" : fmt(v)} (${verdict})`));
        det.appendChild(ol);
        cell.appendChild(det);
      } else cell.textContent = "none yet";
      tr.appendChild(cell);
      return tr;
    });
    if (!trs.length) { const tr = el("tr"); tr.appendChild(el("td", { colspan: 5 }, "No metric checks: the sequential judges decide.")); trs.push(tr); }
    body.replaceChildren(...trs);
  }

  function events(d) {
    const ol = $("events");
    if (ol.childElementCount === d.events.length && ol.dataset.last === (d.events.length ? d.events[d.events.length - 1].time : "")) return;
    ol.dataset.last = d.events.length ? d.events[d.events.length - 1].time : "";
    ol.replaceChildren(...d.events.slice().reverse().map((e) => {
      const li = el("li", { class: e.level });
      li.appendChild(el("time", { datetime: e.time }, new Date(e.time).toLocaleTimeString()));
      li.append(e.message + (e.phase ? ` (${e.phase}, ${pct(e.canaryWeight)})` : ""));
      return li;
    }));
  }

  // ---- signing in and acting ----
  function showSession() {
    $("who").hidden = !session.signedIn && !session.readOnly;
    $("sign-out").hidden = !session.signedIn;
    $("open-sign-in").hidden = session.signedIn || session.readOnly;
    setText($("who"), session.signedIn ? "Signed in as " + session.name : session.readOnly ? "Read-only: " + session.hint : "");
  }
  async function loadSession() {
    const r = await fetch("/api/v1/session", { credentials: "same-origin" });
    session = r.ok ? await r.json() : { signedIn: false };
    showSession();
  }
  function openSignIn() { $("sign-in").hidden = false; $("sign-in-name").focus(); }
  $("open-sign-in").addEventListener("click", openSignIn);
  $("cancel-sign-in").addEventListener("click", () => { $("sign-in").hidden = true; });
  $("sign-in").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setText($("sign-in-error"), "");
    const r = await fetch("/api/v1/session", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: $("sign-in-name").value, token: $("sign-in-token").value }) });
    const body = await r.json();
    if (!r.ok) { setText($("sign-in-error"), body.error || "refused"); return; }
    $("sign-in-token").value = "";
    session = body; showSession(); $("sign-in").hidden = true; notice("");
  });
  $("sign-out").addEventListener("click", async () => {
    await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin", headers: { "x-csrf-token": session.csrf || "" } });
    session = { signedIn: false }; showSession();
  });
  let confirming = null;
  $("actions").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-command]");
    if (!b || !detail) return;
    const command = b.dataset.command;
    if (command === "abort" && confirming !== b) {
      // A second press confirms: aborting rolls the canary back.
      confirming = b; b.classList.add("confirm"); b.textContent = "Confirm abort";
      setTimeout(() => { if (confirming === b) { confirming = null; b.classList.remove("confirm"); b.textContent = "Abort"; } }, 5000);
      return;
    }
    confirming = null; b.classList.remove("confirm"); if (command === "abort") b.textContent = "Abort";
    const r = await fetch(`/api/v1/rollouts/${encodeURIComponent(detail.key)}/${command}`, {
      method: "POST", credentials: "same-origin", headers: { "x-csrf-token": session.csrf || "" } });
    const body = await r.json().catch(() => ({}));
    if (r.status === 401) { notice(`Refused: sign in to ${command}. ${body.error || ""}`); openSignIn(); return; }
    notice(r.ok ? "" : `Refused: ${body.error || r.status}`);
  });

  // ---- routing ----
  function route() {
    const m = location.hash.match(/^#\/rollouts\/(.+)$/);
    const g = location.hash.match(/^#\/groups\/(.+)$/);
    $("list").hidden = !!(m || g);
    $("detail").hidden = !m;
    $("group").hidden = !g;
    if (m) openDetail(decodeURIComponent(m[1]));
    else detail = null;
    if (g) openGroup(decodeURIComponent(g[1]));
    else group = null;
  }
  window.addEventListener("hashchange", route);

  // For the browser test: the same path a burst of server changes takes, timed.
  window.coalmine = { applyChange, render: () => { if (frame) { cancelAnimationFrame(frame); } render(); } };

  loadSession();
  connect();
  route();
})();
