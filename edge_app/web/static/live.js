// The live view: one EventSource; every text goes in with textContent (never as HTML).
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const fmt = v => (v === null || v === undefined) ? "–" : (typeof v === "number" ? v.toFixed(3) : String(v));
  const dur = s => { s = Math.floor(s); const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60); return `${h} h ${m} min ${s % 60} s`; };

  function show(p) {
    const s = p.snapshot;
    const st = $("state");
    const state = s.paused ? "paused" : s.state;
    st.textContent = state === "ok" ? "OK: inspecting" : state === "paused" ? "PAUSED" : "DEGRADED";
    st.className = "state " + state;
    $("reasons").textContent = s.reasons.join("; ");
    $("rate").textContent = s.rates.verdicts_per_min.toFixed(0);
    $("n-ok").textContent = s.verdicts.ok; $("n-ng").textContent = s.verdicts.ng; $("n-ni").textContent = s.verdicts.not_inspected;
    $("queue").textContent = s.queue_depth; $("backlog").textContent = s.outbox_backlog + (s.unstored ? ` (${s.unstored} in memory)` : "");
    $("mqtt").textContent = s.mqtt_connected ? "connected" : ("down: " + (s.mqtt_error || "reconnecting"));
    $("uptime").textContent = dur(s.uptime_s);
    const ni = Object.entries(s.not_inspected).filter(([, n]) => n > 0).map(([r, n]) => `${r} ${n}`);
    $("ni-reasons").textContent = ni.length ? ni.join(", ") : "none";
    const stages = Object.keys(s.rates).filter(k => k.endsWith("_p50_ms")).map(k => k.slice(0, -7));
    $("latency").textContent = stages.map(st => `${st} ${s.rates[st + "_p50_ms"].toFixed(1)} / ${s.rates[st + "_p99_ms"].toFixed(1)} ms`).join(" · ") || "–";
    $("cam-states").textContent = Object.entries(s.cameras).map(([c, v]) => `${c}: ${v}`).join(", ") || "–";
    for (const fig of document.querySelectorAll("figure.cam")) {
      const cam = fig.dataset.camera, c = p.cameras[cam];
      if (!c) continue;
      const f = name => fig.querySelector(`[data-field="${name}"]`);
      const v = f("verdict"); v.textContent = c.verdict + (c.reason && c.verdict !== "ok" ? ` (${c.reason})` : ""); v.className = "verdict " + c.verdict;
      f("part").textContent = c.part_id; f("score").textContent = fmt(c.score); f("threshold").textContent = fmt(c.threshold);
      f("regions").textContent = c.regions; f("frame").textContent = c.frame;
      const img = f("image");
      if (img.dataset.key !== c.key) { img.dataset.key = c.key; img.src = `/live/${encodeURIComponent(cam)}.jpg?k=${encodeURIComponent(c.key)}`; }
    }
    trendChart($("trend"), p.trend, s.threshold);
    const tb = document.querySelector("#last tbody");
    tb.replaceChildren(...p.last.map(r => {
      const tr = document.createElement("tr"); tr.className = "v-" + r.verdict;
      for (const v of [r.part_id, r.camera, r.verdict, r.reason || "", fmt(r.score)]) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
      return tr;
    }));
  }

  function connect() {
    const es = new EventSource("/api/events");
    es.onmessage = e => show(JSON.parse(e.data));
    es.onerror = () => { $("state").textContent = "page lost the station: reconnecting…"; $("state").className = "state degraded"; };
  }
  connect();
})();
