// The browser console of one VM (templates/labs/vm_console.html; docs/console-client.md).
//
// On load and on "Reconnect": POST for a single-use ticket (CSRF), open the websocket with
// the ticket as its subprotocol ("stratus.ticket.<token>") and hand it to noVNC. The
// ticket lives only in a local variable: never in a URL, the DOM, the console or storage.

import RFB from "../novnc/core/rfb.js";
import KeyTable from "../novnc/core/input/keysym.js";
import keysyms from "../novnc/core/input/keysymdef.js";
import { initLogging } from "../novnc/core/util/logging.js";

// noVNC logs the server's chosen subprotocol (the ticket) at "info": stay at "warn".
initLogging("warn");

const root = document.getElementById("console");
const screen = document.getElementById("console-screen");
const statusLine = document.getElementById("console-status");
const reconnectButton = document.getElementById("console-reconnect");
const cadButton = document.getElementById("console-cad"); // absent when observing
const pasteForm = document.getElementById("console-paste-form");
const pasteText = document.getElementById("console-paste-text");
const pasteButton = document.getElementById("console-paste-send");

// The server's console contract (labs/consoles/rules.py client_config): where to get a
// ticket, where to connect, how to offer the ticket, and what each close code means.
const config = {
  ticketUrl: root.dataset.ticketUrl,
  wsPath: root.dataset.wsPath,
  subprotocolPrefix: root.dataset.subprotocolPrefix,
  viewOnly: root.dataset.viewOnly === "true",
};

let rfb = null;
let connected = false; // the current RFB object reached "connected"
let closeInfo = null; // {code, reason} of the websocket's close event
let typing = null; // the running paste, {cancelled}
let attempt = 0; // the latest connect(); events of older attempts are ignored

// --- status ---------------------------------------------------------------------------

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.textContent = text;
  const live = state === "connected";
  reconnectButton.hidden = !(state === "ended" || state === "error");
  if (cadButton) cadButton.disabled = !live;
  if (pasteButton) pasteButton.disabled = !live || typing !== null;
}

class TicketError extends Error {
  constructor(message, { transient = false } = {}) {
    super(message);
    this.transient = transient; // the server may answer in a moment (unreachable, 5xx)
  }
}

// --- ticket ---------------------------------------------------------------------------

function csrfToken() {
  const input = root.querySelector("input[name=csrfmiddlewaretoken]");
  if (input && input.value) return input.value;
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

async function fetchTicket() {
  const body = new URLSearchParams();
  if (config.viewOnly) body.set("mode", "view");
  let response;
  try {
    response = await fetch(config.ticketUrl, {
      method: "POST",
      body,
      headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
      redirect: "manual", // a redirect here means "signed out", not a ticket
    });
  } catch {
    throw new TicketError("Stratus could not be reached. Check your connection.", {
      transient: true,
    });
  }
  if (response.type === "opaqueredirect" || response.status === 401) {
    throw new TicketError("You are signed out. Reload the page to sign in again.");
  }
  if (response.status === 403) {
    throw new TicketError("Your session changed. Reload the page and try again.");
  }
  if (response.status === 404) {
    throw new TicketError("This console is not available to you.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok || !data || typeof data.ticket !== "string") {
    const message = data && typeof data.error === "string" ? data.error : "";
    throw new TicketError(message || `The console could not start (HTTP ${response.status}).`, {
      transient: response.status >= 500,
    });
  }
  return data;
}

function websocketUrl() {
  // A full ws(s):// URL is used as it is (a console proxy on another host); a path is
  // joined to this page's host.
  if (/^wss?:\/\//.test(config.wsPath)) return config.wsPath;
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${config.wsPath}`;
}

// --- connection -----------------------------------------------------------------------

// What each close code means, as the server defines them (labs/consoles/rules.py).
const CLOSE_REASONS = JSON.parse(document.getElementById("console-close-reasons").textContent);

function closeMessage(clean, wasConnected) {
  const info = closeInfo || { code: 0, reason: "" };
  const why = info.reason || CLOSE_REASONS[info.code] || "";
  if (!wasConnected) {
    // A refusal is a bare close on purpose: the page cannot tell which check failed.
    return why
      ? `Could not connect: ${why}.`
      : "Could not connect. The VM may have stopped, or access was refused; try again.";
  }
  if (why) return `Session ended: ${why}.`;
  if (clean) return "Session ended.";
  return "Disconnected: the connection was lost.";
}

function teardown() {
  if (typing) typing.cancelled = true;
  if (rfb) {
    const old = rfb;
    rfb = null;
    old.removeEventListener("disconnect", onDisconnect);
    try {
      old.disconnect();
    } catch {
      // already disconnected
    }
  }
}

// A session that was running and dropped because the server went away (a restart of the
// site, a lost connection) comes back by itself with a fresh ticket; one closed on purpose
// (access ended, idle, time limit) does not.
const COMES_BACK = new Set([1001, 1006, 1011, 1012, 1013]);
const BACK_TRIES = 6;
let comingBack = 0; // reconnection attempts since the last session that connected

function retryLater() {
  if (comingBack >= BACK_TRIES) return false;
  comingBack += 1;
  const delay = Math.min(1000 * 2 ** (comingBack - 1), 8000);
  setStatus(
    "connecting",
    `The connection was lost; reconnecting (attempt ${comingBack} of ${BACK_TRIES})…`,
  );
  window.setTimeout(connect, delay);
  return true;
}

// A VM moved live to another host (CloseCode.MOVED, reason "moved to <host>"): the page
// connects to it there by itself, at short intervals while the move is recorded.
const MOVED = 4004;
const MOVE_TRIES = 12;
let movedTo = ""; // the host of the last move, said until a session there connects
let following = 0; // reconnection attempts since the move

function followMove() {
  if (following >= MOVE_TRIES) return false;
  following += 1;
  const delay = Math.min(250 * 2 ** (following - 1), 1000);
  setStatus("connecting", `The VM moved to ${movedTo}; reconnecting…`);
  window.setTimeout(connect, delay);
  return true;
}

function onConnect() {
  connected = true;
  comingBack = 0;
  following = 0;
  const observing = rfb.viewOnly;
  const moved = movedTo ? ` The VM moved to ${movedTo}.` : "";
  movedTo = "";
  setStatus(
    "connected",
    (observing ? "Connected, observing (view only)." : "Connected.") + moved,
  );
  if (!observing) rfb.focus({ preventScroll: true }); // the keyboard goes to the VM
}

function onDisconnect(event) {
  rfb = null;
  if (typing) typing.cancelled = true;
  const clean = Boolean(event.detail && event.detail.clean);
  const code = closeInfo ? closeInfo.code : 1006;
  if (connected && code === MOVED) {
    movedTo = closeInfo.reason.replace(/^moved to /, "") || "another host";
    following = 0;
  }
  if ((code === MOVED || following > 0) && followMove()) {
    connected = false;
    return;
  }
  if ((connected || comingBack > 0) && COMES_BACK.has(code) && retryLater()) {
    connected = false;
    return;
  }
  setStatus(clean && connected ? "ended" : "error", closeMessage(clean, connected));
  connected = false;
}

function onSecurityFailure(event) {
  const reason = event.detail && event.detail.reason;
  closeInfo = { code: 0, reason: reason ? `the VM's display refused (${reason})` : "" };
}

function onCredentialsRequired() {
  closeInfo = { code: 0, reason: "the VM's display asks for a password Stratus does not have" };
  if (rfb) rfb.disconnect();
}

async function connect() {
  const mine = ++attempt;
  teardown();
  closeInfo = null;
  connected = false;
  reconnectButton.hidden = true;
  setStatus("connecting", "Requesting access…");
  let ticket;
  let viewOnly = config.viewOnly;
  try {
    const data = await fetchTicket();
    ticket = data.ticket;
    viewOnly = viewOnly || data.view_only === true;
  } catch (error) {
    if (mine !== attempt) return;
    // Following a move, only a server that may answer in a moment is tried again; a
    // signed-out user or an access that ended hears so at once.
    if (following > 0 && error instanceof TicketError && error.transient && followMove()) return;
    if (comingBack > 0 && error instanceof TicketError && error.transient && retryLater()) return;
    const text = error instanceof TicketError ? error.message : "The console could not start.";
    setStatus("error", text);
    return;
  }
  if (mine !== attempt) return; // a newer attempt started meanwhile; this ticket just expires
  setStatus("connecting", "Connecting…");
  // The websocket is opened here (not by noVNC from a URL) so that its close code and
  // reason can be shown; noVNC accepts an open or opening WebSocket.
  const socket = new WebSocket(websocketUrl(), [config.subprotocolPrefix + ticket]);
  ticket = null;
  socket.addEventListener("close", (event) => {
    if (mine === attempt) closeInfo = closeInfo || { code: event.code, reason: event.reason };
  });
  try {
    rfb = new RFB(screen, socket, { shared: true });
  } catch {
    socket.close();
    setStatus("error", "The console could not start in this browser.");
    return;
  }
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.clipViewport = false;
  rfb.focusOnClick = !viewOnly;
  rfb.addEventListener("connect", onConnect);
  rfb.addEventListener("disconnect", onDisconnect);
  rfb.addEventListener("securityfailure", onSecurityFailure);
  rfb.addEventListener("credentialsrequired", onCredentialsRequired);
}

// --- typing text into the guest -------------------------------------------------------

// US-layout physical keys for printable ASCII: [KeyboardEvent.code, needs Shift].
// Sending the key code lets QEMU's extended key events press the same key a US keyboard
// would; other VNC servers use the keysym that goes with it.
const SHIFTED = { "!": "1", "@": "2", "#": "3", $: "4", "%": "5", "^": "6", "&": "7",
  "*": "8", "(": "9", ")": "0" };
const PUNCTUATION = {
  " ": ["Space", false], "-": ["Minus", false], _: ["Minus", true], "=": ["Equal", false],
  "+": ["Equal", true], "[": ["BracketLeft", false], "{": ["BracketLeft", true],
  "]": ["BracketRight", false], "}": ["BracketRight", true], "\\": ["Backslash", false],
  "|": ["Backslash", true], ";": ["Semicolon", false], ":": ["Semicolon", true],
  "'": ["Quote", false], '"': ["Quote", true], ",": ["Comma", false], "<": ["Comma", true],
  ".": ["Period", false], ">": ["Period", true], "/": ["Slash", false], "?": ["Slash", true],
  "`": ["Backquote", false], "~": ["Backquote", true],
};

function keyFor(char) {
  // -> {keysym, code, shift} or null for characters that cannot be typed.
  if (char === "\n" || char === "\r") {
    return { keysym: KeyTable.XK_Return, code: "Enter", shift: false };
  }
  if (char === "\t") return { keysym: KeyTable.XK_Tab, code: "Tab", shift: false };
  const point = char.codePointAt(0);
  if (point < 0x20 || point === 0x7f) return null;
  const keysym = keysyms.lookup(point);
  if (/^[a-z]$/.test(char)) return { keysym, code: `Key${char.toUpperCase()}`, shift: false };
  if (/^[A-Z]$/.test(char)) return { keysym, code: `Key${char}`, shift: true };
  if (/^[0-9]$/.test(char)) return { keysym, code: `Digit${char}`, shift: false };
  if (char in SHIFTED) return { keysym, code: `Digit${SHIFTED[char]}`, shift: true };
  if (char in PUNCTUATION) {
    const [code, shift] = PUNCTUATION[char];
    return { keysym, code, shift };
  }
  return { keysym, code: undefined, shift: false }; // beyond ASCII: the keysym alone
}

function typeKey(key) {
  if (key.shift) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", true);
  rfb.sendKey(key.keysym, key.code, true);
  rfb.sendKey(key.keysym, key.code, false);
  if (key.shift) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", false);
}

const KEYS_PER_TICK = 8; // a PS/2 keyboard buffer is small: type in paced bursts
const TICK_MS = 25;

function typeText(text) {
  const keys = [];
  let skipped = 0;
  const chars = Array.from(text.replace(/\r\n/g, "\n"));
  for (const char of chars) {
    const key = keyFor(char);
    if (key) keys.push(key);
    else skipped += 1;
  }
  const job = { cancelled: false };
  typing = job;
  pasteButton.disabled = true;
  let index = 0;
  const finish = (message) => {
    typing = null;
    if (rfb) {
      setStatus("connected", message);
      rfb.focus({ preventScroll: true });
    }
  };
  const tick = () => {
    if (job.cancelled || !rfb) {
      typing = null;
      return;
    }
    const end = Math.min(index + KEYS_PER_TICK, keys.length);
    for (; index < end; index += 1) typeKey(keys[index]);
    if (index < keys.length) {
      window.setTimeout(tick, TICK_MS);
      return;
    }
    const plural = (n) => (n === 1 ? "" : "s");
    const note = skipped ? ` (${skipped} control character${plural(skipped)} left out)` : "";
    finish(`Typed ${keys.length} character${plural(keys.length)}${note}.`);
  };
  tick();
}

// --- wiring ---------------------------------------------------------------------------

reconnectButton.addEventListener("click", () => {
  comingBack = 0; // a person asked: a fresh round of automatic tries after this one
  following = 0;
  connect();
});

if (cadButton) {
  cadButton.addEventListener("click", () => {
    if (!rfb) return;
    rfb.sendCtrlAltDel();
    rfb.focus({ preventScroll: true });
  });
}

if (pasteForm) {
  pasteForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!rfb || typing || !pasteText.value) return;
    pasteForm.closest("details").open = false; // out of the way of the screen
    typeText(pasteText.value);
  });
}

// Tabbing onto the screen gives the keyboard to the VM.
screen.addEventListener("focus", (event) => {
  if (event.target === screen && rfb && !config.viewOnly) rfb.focus({ preventScroll: true });
});

// Ctrl+Alt+Shift+F leaves the screen: the F never reaches the VM, the modifiers' releases
// do, and focus moves to the toolbar once they are all up (so nothing stays held down).
let leaving = false;
screen.addEventListener(
  "keydown",
  (event) => {
    if (event.ctrlKey && event.altKey && event.shiftKey && event.code === "KeyF") {
      event.preventDefault();
      event.stopPropagation();
      leaving = true;
    }
  },
  true,
);
screen.addEventListener(
  "keyup",
  (event) => {
    if (!leaving) return;
    if (event.code === "KeyF") {
      event.preventDefault();
      event.stopPropagation();
    }
    if (!event.ctrlKey && !event.altKey && !event.shiftKey) {
      leaving = false;
      window.setTimeout(() => root.querySelector(".console-back").focus(), 0);
    }
  },
  true,
);

window.addEventListener("pagehide", () => teardown());
window.addEventListener("pageshow", (event) => {
  if (event.persisted) connect(); // back from the browser's page cache: a fresh session
});

connect();
