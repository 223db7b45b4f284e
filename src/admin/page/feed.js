// The node's web page: the live feed of GET /api/feed (Ppl's model: the newest portion,
// older pages while scrolling down until "oldest reached", live rows on top unless paused,
// resume reloads the newest portion) and the partners of GET /api/status, polled.
// No framework, no build step: this file is served as it is by the node.
"use strict";

(() => {
  const PORTION = 50;           // entries per page
  const MAX_ROWS = 2000;        // rows kept in the page; older ones are dropped (and paged again)
  const PAUSE_AFTER_PX = 24;    // scrolling further from the top pauses the live rows
  const OLDER_BEFORE_PX = 120;  // this close to the bottom, the next older page is asked for
  const STATUS_EVERY_MS = 2000; // the partners table is refreshed this often
  const RECONNECT_MIN_MS = 500, RECONNECT_MAX_MS = 10000;
  const TOKEN_KEY = "oc-discovery.admin-token";

  const $ = (id) => document.getElementById(id);
  const feedBox = $("feed"), rows = $("rows"), end = $("end"), state = $("state");
  const resumeBtn = $("resume"), notice = $("notice");

  let token = sessionStorage.getItem(TOKEN_KEY);
  let socket = null, reconnectDelay = RECONNECT_MIN_MS, reconnectTimer = null;
  const view = {
    feed: "journal", dataType: "", origin: "",
    paused: false, before: null, oldestReached: false, olderPending: false,
    replaceOnPage: true,
  };

  // --- the admin token -------------------------------------------------------------------
  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function base64url(text) {
    let bin = "";
    for (const b of new TextEncoder().encode(text)) bin += String.fromCharCode(b);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function askToken(message) {
    const dialog = $("login"), err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    if (!dialog.open) dialog.showModal();
    $("login-token").focus();
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("login-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").close();
    start();
  });

  // --- rendering -------------------------------------------------------------------------
  const short = (id) => (id && id.length > 16 ? id.slice(0, 6) + "…" + id.slice(-6) : id || "");
  const clock = (ms) => {
    if (!ms) return "";
    const d = new Date(ms);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  };
  const cell = (text, cls, title) => {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    if (cls) td.className = cls;
    if (title) td.title = title;
    return td;
  };

  // A journal entry, or an applied record {key, applied_ms, entry}.
  function row(item, live) {
    const applied = view.feed === "applied";
    const e = applied ? item.entry : item;
    const key = applied ? item.key : e.seq;
    const tr = document.createElement("tr");
    tr.className = "entry" + (live ? " fresh" : "");
    tr.dataset.key = key;
    const action = String(e.action || "").replace(/^PB_/, "").toLowerCase();
    const resource = e.resource || {};
    tr.append(
      cell(key, "key", applied ? "apply key " + key + ", origin seq " + e.seq : "seq " + key),
      cell(clock(applied ? item.applied_ms : e.time_ms), "time"),
      cell(action, "action " + action),
      cell(e.data_type, "type"),
      cell(resource.id, "id", resource.id),
      cell(short(e.origin), "origin", e.origin),
      cell(e.user, "user"),
    );
    return tr;
  }

  function showEnd() {
    end.textContent = view.oldestReached ? "oldest reached" : (view.olderPending ? "loading older…" : "scroll for older");
    end.classList.toggle("oldest", view.oldestReached);
  }

  function showState() {
    const connected = socket && socket.readyState === WebSocket.OPEN;
    state.textContent = !connected ? "offline" : (view.paused ? "paused" : "live");
    state.className = "state " + (!connected ? "off" : (view.paused ? "paused" : "live-on"));
    resumeBtn.hidden = !view.paused;
  }

  function say(text) {
    notice.hidden = !text;
    notice.textContent = text || "";
  }

  function trim() {
    while (rows.children.length > MAX_ROWS) {
      rows.lastElementChild.remove();
      const last = rows.lastElementChild;
      view.before = last ? Number(last.dataset.key) : null;
      view.oldestReached = false;
    }
  }

  function onPage(msg) {
    if (view.replaceOnPage) {
      rows.replaceChildren();
      feedBox.scrollTop = 0;
      view.replaceOnPage = false;
    }
    const frag = document.createDocumentFragment();
    for (const item of msg.entries) frag.append(row(item, false));
    rows.append(frag);
    view.olderPending = false;
    view.oldestReached = !!msg.oldest_reached;
    const last = rows.lastElementChild;
    view.before = msg.before != null ? msg.before : (last ? Number(last.dataset.key) : null);
    trim();
    showEnd();
    // A short first page does not scroll: fetch older ones until the box fills.
    if (!view.oldestReached && feedBox.scrollHeight <= feedBox.clientHeight) older();
  }

  function onLive(entry) {
    if (view.paused) return;
    rows.prepend(row(entry, true));
    trim();
  }

  // --- the WebSocket ---------------------------------------------------------------------
  function send(msg) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg));
  }

  function subscribe() {
    view.paused = false;
    view.replaceOnPage = true;
    view.olderPending = false;
    const msg = { type: "subscribe", feed: view.feed, portion: PORTION };
    if (view.dataType) msg.data_type = view.dataType;
    if (view.origin && view.feed === "applied") msg.origin = view.origin;
    send(msg);
    showState();
  }

  function older() {
    if (view.olderPending || view.oldestReached || view.before == null) return;
    view.olderPending = true;
    send({ type: "older", before: view.before });
    showEnd();
  }

  function pause() {
    if (view.paused) return;
    view.paused = true;
    send({ type: "pause" });
    showState();
  }

  function resume() {
    view.paused = false;
    view.replaceOnPage = true;
    send({ type: "resume" });
    say("");
    showState();
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/feed";
    const protocols = ["oc-discovery.feed"];
    if (token) protocols.push("bearer." + base64url(token));
    const ws = new WebSocket(url, protocols);
    socket = ws;
    ws.onopen = () => {
      reconnectDelay = RECONNECT_MIN_MS;
      say("");
      subscribe();
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      switch (msg.type) {
        case "page": onPage(msg); break;
        case "live": onLive(msg.entry); break;
        case "lagged":
          say("The feed went faster than this page: " + msg.skipped + " entries skipped, newest portion reloaded.");
          view.paused = false;
          view.replaceOnPage = true;
          send({ type: "resume" });
          showState();
          break;
        case "error": say("The node refused: " + msg.code + ": " + msg.message); break;
      }
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      showState();
      // The handshake's 401 is not visible here: the status poll asks for the token.
      reconnectTimer = setTimeout(connect, reconnectDelay);
      reconnectDelay = Math.min(reconnectDelay * 2, RECONNECT_MAX_MS);
    };
  }

  // --- the partners ----------------------------------------------------------------------
  function age(ms) {
    if (ms == null) return "0 s";
    return ms < 10000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 1000) + " s";
  }

  function renderStatus(s) {
    $("node-peer").textContent = short(s.peer_id);
    $("node-peer").title = s.peer_id;
    $("node-head").textContent = s.journal_head == null ? "-" : s.journal_head;
    $("node-intake").textContent = s.intake.mode + (s.intake.pending != null ? " (" + s.intake.pending + " pending)" : "");
    $("node-nats").textContent = s.nats.state;
    const body = $("peer-rows");
    const list = s.partners || [];
    if (!list.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      tr.append(cell("no partners configured"));
      tr.firstChild.colSpan = 6;
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...list.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.peer = p.peer_id;
      const lag = p.lag || {};
      tr.append(
        cell(short(p.peer_id), "peer", p.peer_id + (p.last_error ? "\nlast error: " + p.last_error : "")),
        cell(p.state, "state " + p.state),
        cell(p.acked_seq, "num"),
        cell(p.pending, "num"),
        cell(lag.seq ? lag.seq + " · " + age(lag.oldest_unacked_age_ms) : "0", "num lag"),
        cell(p.rtt_ms == null ? "-" : p.rtt_ms.toFixed(1) + " ms", "num rtt"),
      );
      return tr;
    }));
  }

  let statusTimer = null;
  async function pollStatus() {
    clearTimeout(statusTimer);
    try {
      const r = await fetch("/api/status", { headers: authHeaders(), cache: "no-store" });
      if (r.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        const hadToken = !!token;
        token = null;
        stop();
        askToken(hadToken ? "That token was refused." : "");
        return false;
      }
      const s = await r.json();
      if (!r.ok) throw new Error((s.error && s.error.message) || r.status);
      $("peers-error").hidden = true;
      renderStatus(s);
    } catch (e) {
      $("peers-error").hidden = false;
      $("peers-error").textContent = "status unavailable: " + e.message;
    }
    statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
    return true;
  }

  // --- controls --------------------------------------------------------------------------
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => {
      view.feed = tab.dataset.feed;
      for (const t of document.querySelectorAll("[role=tab]")) t.setAttribute("aria-selected", String(t === tab));
      document.body.classList.toggle("applied", view.feed === "applied");
      $("filter-origin").hidden = view.feed !== "applied";
      subscribe();
    });
  }

  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.dataType = $("filter-type").value.trim();
    view.origin = $("filter-origin").value.trim();
    subscribe();
  });

  resumeBtn.addEventListener("click", resume);

  feedBox.addEventListener("scroll", () => {
    if (feedBox.scrollTop > PAUSE_AFTER_PX) pause();
    if (feedBox.scrollHeight - feedBox.scrollTop - feedBox.clientHeight < OLDER_BEFORE_PX) older();
  }, { passive: true });

  function stop() {
    clearTimeout(reconnectTimer);
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close();
    }
    showState();
  }

  async function start() {
    if (await pollStatus()) connect();
  }

  start();
})();
