// Live updates for server-rendered pages (docs/live-updates.md).
//
// A page opts in with an element carrying data-live-url (or <body data-live>) and marks
// what may change with data-live-region="<unique key>". When something changes, the server
// renders the changed regions once for everyone of the page's audience
// (data-live-audience: the group's members, the course's staff; labs/live/regions.py) and
// pushes their HTML on the events socket; this script swaps each region whose HTML
// changed, leaving alone the regions where the user has focus in a text field or unsaved
// input (they are applied once the user leaves the field). After every (re)connect it GETs
// the page once, which covers whatever was missed meanwhile. The small events feed the
// aria-live announcements. A page without pushed regions (no data-live-group or
// data-live-course) GETs itself again on its events instead.
//
// No framework, no build step, no CDN; no inline script is needed.
(() => {
  "use strict";

  const root =
    document.querySelector("[data-live-url]") || document.querySelector("body[data-live]");
  if (!root || !("WebSocket" in window) || !("fetch" in window)) return;

  const config = {
    url: root.dataset.liveUrl || window.location.pathname + window.location.search,
    socket: root.dataset.liveSocket || "/ws/events/",
    group: root.dataset.liveGroup || "",
    course: root.dataset.liveCourse || "",
    audience: root.dataset.liveAudience || "",
  };
  // Which pushed renderings are this page's: "group" or "course" (the overview).
  config.page = config.group ? "group" : config.course ? "course" : "";
  const COALESCE_MS = 120; // events closer than this make one refresh
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  const FETCH_TIMEOUT_MS = 15000;
  const REGION = "[data-live-region]";
  // A fetched page's forms carry this viewer's CSRF token, a pushed rendering's none
  // (confirm.js adds the token at submit time): not a change worth a swap.
  const CSRF_INPUT = /<input type="hidden" name="csrfmiddlewaretoken" value="[^"]*">/g;

  const statusLine = document.querySelector("[data-live-status]") || makeStatusLine();
  const announcer = document.querySelector("[data-live-announce]") || makeAnnouncer();

  let socket = null;
  let backoff = BACKOFF_MIN_MS;
  let retryTimer = 0;
  let refreshTimer = 0;
  let fetching = false;
  let fetchAgain = false;
  let held = false; // a region was left alone because the user is typing in it
  let renderedAt = Number(root.dataset.liveAt) || 0; // server time of what is shown
  const waiting = new Map(); // region key -> pushed HTML held back by the user's input
  let leaving = false; // a form was submitted or the page is being hidden
  let stopped = false;
  const served = new Map(); // region key -> the server's HTML that the region shows
  const announced = new Set();

  // --- status and announcements ---------------------------------------------------------

  function makeStatusLine() {
    const line = document.createElement("p");
    line.className = "live-status";
    line.setAttribute("data-live-status", "");
    root.prepend(line);
    return line;
  }

  function makeAnnouncer() {
    const region = document.createElement("p");
    region.className = "live-announce";
    region.setAttribute("data-live-announce", "");
    region.setAttribute("role", "status");
    region.setAttribute("aria-live", "polite");
    region.setAttribute("aria-atomic", "true");
    statusLine.after(region);
    return region;
  }

  function setStatus(state, text) {
    statusLine.dataset.state = state;
    statusLine.textContent = text;
    statusLine.hidden = false;
    document.dispatchEvent(new CustomEvent("live:status", { detail: { state } }));
  }

  function announce(event) {
    if (event.type !== "operation") return;
    if (event.status !== "succeeded" && event.status !== "failed") return;
    const key = `${event.operation}:${event.status}`;
    if (announced.has(key)) return;
    announced.add(key);
    // A course page lists every group's vm1: name the group there.
    const vm = config.group ? event.vm_name : `${event.group_name}/${event.vm_name}`;
    let text = `${event.kind_display} of ${vm} ${String(event.status_display).toLowerCase()}`;
    if (event.status === "failed" && event.error) text += `: ${event.error}`;
    // Cleared first, so that the same words twice are announced twice.
    announcer.textContent = "";
    window.setTimeout(() => {
      announcer.textContent = text;
    }, 50);
  }

  // --- the websocket ----------------------------------------------------------------------

  function connect() {
    if (stopped || leaving) return;
    window.clearTimeout(retryTimer);
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      // A group page says which: a staff member's socket then joins that page's staff
      // rendering (the server decides who is staff).
      const page = config.group ? `?group=${encodeURIComponent(config.group)}` : "";
      ws = new WebSocket(`${scheme}//${window.location.host}${config.socket}${page}`);
    } catch (error) {
      reconnectLater();
      return;
    }
    socket = ws;
    ws.addEventListener("open", () => {
      if (socket !== ws) return;
      backoff = BACKOFF_MIN_MS;
      setStatus("live", "Live");
      refresh(); // whatever happened before this connection
    });
    ws.addEventListener("message", (message) => {
      if (socket === ws) receive(message.data);
    });
    ws.addEventListener("close", (close) => {
      if (socket !== ws) return;
      socket = null;
      if (stopped || leaving) return;
      if (close.code === 4001) {
        stop("gone", "Live updates ended: reload the page.");
        return;
      }
      setStatus("reconnecting", "Reconnecting…");
      reconnectLater();
    });
  }

  function reconnectLater() {
    window.clearTimeout(retryTimer);
    const delay = backoff;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    retryTimer = window.setTimeout(connect, delay);
  }

  function stop(state, text) {
    stopped = true;
    window.clearTimeout(retryTimer);
    window.clearTimeout(refreshTimer);
    setStatus(state, text);
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close();
    }
  }

  function receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch (error) {
      return;
    }
    if (!event || typeof event !== "object") return;
    if (event.type === "regions") {
      if (isThisPages(event)) applyPushed(event);
      return;
    }
    if (event.type === "access") {
      refreshSoon(); // what this user may see changed: fetch the page once
      return;
    }
    if (!concernsThisPage(event)) return;
    announce(event);
    document.dispatchEvent(new CustomEvent("live:event", { detail: event }));
    if (!config.page) refreshSoon(); // a page whose regions are not pushed
  }

  function concernsThisPage(event) {
    if (config.group && String(event.group) !== config.group) return false;
    if (config.course && String(event.course) !== config.course) return false;
    return true;
  }

  function isThisPages(push) {
    if (!config.page || push.page !== config.page) return false;
    if (push.audience !== config.audience) return false;
    return concernsThisPage(push);
  }

  // --- pushed regions ---------------------------------------------------------------------

  function applyPushed(push) {
    if (stopped || leaving) return;
    const at = Number(push.at) || 0;
    if (at && at < renderedAt) return; // older than what is shown (a late delivery)
    if (at) renderedAt = at;
    for (const [key, markup] of Object.entries(push.regions || {})) waiting.set(key, markup);
    applyWaiting();
  }

  function applyWaiting() {
    held = false;
    for (const [key, markup] of Array.from(waiting)) {
      const current = regionIn(document, key);
      const template = document.createElement("template");
      template.innerHTML = markup;
      const fresh = template.content.querySelector(REGION);
      if (!current || !fresh || sync(current, fresh)) waiting.delete(key);
    }
    document.dispatchEvent(new CustomEvent("live:refreshed"));
  }

  // --- refreshing the regions -------------------------------------------------------------

  function refreshSoon() {
    if (!refreshTimer) refreshTimer = window.setTimeout(refresh, COALESCE_MS);
  }

  async function refresh() {
    window.clearTimeout(refreshTimer);
    refreshTimer = 0;
    if (stopped || leaving) return;
    if (fetching) {
      fetchAgain = true;
      return;
    }
    fetching = true;
    const abort = new AbortController();
    const timer = window.setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch(config.url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "text/html", "X-Live-Refresh": "1" },
        signal: abort.signal,
      });
      const wanted = new URL(config.url, window.location.href).pathname;
      if (response.redirected && new URL(response.url).pathname !== wanted) {
        stop("signed-out", "Signed out: sign in again for live updates.");
        return;
      }
      if (response.status === 404 || response.status === 403) {
        stop("gone", "This page is no longer available to you.");
        return;
      }
      if (!response.ok) return; // a server error: the next (re)connect tries again
      const at = Number(response.headers.get("X-Live-At")) || 0;
      const html = await response.text();
      if (stopped || leaving) return;
      if (at && at < renderedAt) return; // a push newer than this page came meanwhile
      if (at) renderedAt = at;
      waiting.clear();
      apply(new DOMParser().parseFromString(html, "text/html"));
    } catch (error) {
      // Offline or timed out: the websocket's reconnection refreshes again.
    } finally {
      window.clearTimeout(timer);
      fetching = false;
      if (fetchAgain) {
        fetchAgain = false;
        refreshSoon();
      }
    }
  }

  function regionIn(scope, key) {
    return scope.querySelector(`[data-live-region="${CSS.escape(key)}"]`);
  }

  function childRegions(region) {
    return Array.from(region.querySelectorAll(REGION)).filter(
      (inner) => inner.parentElement.closest(REGION) === region,
    );
  }

  function topRegions() {
    return Array.from(document.querySelectorAll(REGION)).filter(
      (region) => !region.parentElement.closest(REGION),
    );
  }

  function html(element) {
    return element.outerHTML.replace(CSRF_INPUT, "");
  }

  function remember(element) {
    served.set(element.dataset.liveRegion, html(element));
    element.querySelectorAll(REGION).forEach((inner) => {
      served.set(inner.dataset.liveRegion, html(inner));
    });
  }

  function apply(doc) {
    held = false;
    for (const current of topRegions()) {
      const fresh = regionIn(doc, current.dataset.liveRegion);
      if (fresh) sync(current, fresh);
    }
    document.dispatchEvent(new CustomEvent("live:refreshed"));
  }

  // Whether the region now shows ``fresh`` (false: held back, in part, by the user's input).
  function sync(current, fresh) {
    if (served.get(current.dataset.liveRegion) === html(fresh)) return true;
    if (holdsUserInput(current)) {
      // Leave the user's typing alone; update what is inside that is not in the way.
      held = true;
      for (const inner of childRegions(current)) {
        const next = regionIn(fresh, inner.dataset.liveRegion);
        if (next) sync(inner, next);
      }
      return false;
    }
    replace(current, fresh);
    return true;
  }

  function isTextEntry(element) {
    if (element.isContentEditable) return true;
    if (element.matches("textarea, select")) return true;
    return (
      element.matches("input") &&
      !["button", "submit", "reset", "checkbox", "radio", "hidden", "image"].includes(element.type)
    );
  }

  function isDirty(field) {
    if (field.type === "hidden") return false;
    if (field.type === "checkbox" || field.type === "radio") {
      return field.checked !== field.defaultChecked;
    }
    if (field.tagName === "SELECT") {
      return Array.from(field.options).some((option) => option.selected !== option.defaultSelected);
    }
    return field.value !== field.defaultValue;
  }

  function holdsUserInput(region) {
    const active = document.activeElement;
    if (active && region.contains(active) && isTextEntry(active)) return true;
    return Array.from(region.querySelectorAll("input, textarea, select")).some(isDirty);
  }

  function replace(current, fresh) {
    const active = document.activeElement;
    const focus = active && active !== document.body && current.contains(active)
      ? describe(active, current)
      : null;
    const next = document.importNode(fresh, true);
    current.replaceWith(next);
    remember(next);
    if (focus) restoreFocus(next, focus);
  }

  // Where the keyboard focus was, to put it back on the same control in the new HTML.
  function describe(element, region) {
    const path = [];
    for (let node = element; node && node !== region; node = node.parentElement) {
      path.unshift(Array.prototype.indexOf.call(node.parentElement.children, node));
    }
    return {
      id: element.id,
      tag: element.tagName,
      text: element.textContent.trim(),
      action: element.form ? element.form.getAttribute("action") : null,
      path,
    };
  }

  function restoreFocus(region, focus) {
    let target = focus.id ? document.getElementById(focus.id) : null;
    if (!target && focus.action !== null) {
      target = Array.from(region.querySelectorAll(focus.tag)).find(
        (candidate) =>
          candidate.form &&
          candidate.form.getAttribute("action") === focus.action &&
          candidate.textContent.trim() === focus.text,
      );
    }
    if (!target) {
      let node = region;
      for (const index of focus.path) node = node ? node.children[index] : null;
      if (node && node.tagName === focus.tag) target = node;
    }
    if (target && region.contains(target) && !target.disabled) {
      target.focus({ preventScroll: true });
      if (document.activeElement === target) return;
    }
    // The control is gone (say "Start" once the VM runs): keep the keyboard here.
    region.setAttribute("tabindex", "-1");
    region.focus({ preventScroll: true });
  }

  // --- the page's life --------------------------------------------------------------------

  document.addEventListener("focusout", () => {
    // The user left the field: apply what waited (after the focus has moved on).
    if (held) window.setTimeout(() => (waiting.size ? applyWaiting() : refreshSoon()), 0);
  });
  document.addEventListener("submit", (event) => {
    if (event.defaultPrevented) return;
    leaving = true; // the page is about to be replaced by the form's answer
    window.setTimeout(() => {
      leaving = false; // ...or it was not (a download, a stopped navigation)
    }, 10000);
  });
  window.addEventListener("pagehide", () => {
    leaving = true;
    if (socket) socket.close();
  });
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return; // back from the back/forward cache
    leaving = false;
    if (!socket && !stopped) connect();
  });
  window.addEventListener("online", () => {
    if (socket || stopped) return;
    backoff = BACKOFF_MIN_MS;
    connect();
  });

  topRegions().forEach(remember);
  setStatus("connecting", "Connecting…");
  connect();
})();
