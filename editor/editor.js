// The Tab-completion editor. Runs as gr.HTML's js_on_load, which provides
// `element` (this component's root), `server` (the Python server functions) and more.
// It owns a plain <textarea>; Gradio never re-renders it (the template has no props),
// so the writer's text lives here and in localStorage, never lost to a round trip.

const area = element.querySelector(".tw-text");
const popup = element.querySelector(".tw-popup");
const optionsBox = popup.querySelector(".tw-options");
const popupStatus = popup.querySelector(".tw-popup-status");
const statusLine = element.querySelector(".tw-status");
const DRAFT_KEY = "tabwrite:draft";
const MARKS_KEY = "tabwrite:draft-marks";
const CURRENT_KEY = "tabwrite:current"; // {id, owner_key} of the document being edited
const DOCS_KEY = "tabwrite:docs"; // [{id, owner_key}] saved from this browser ("my documents")

// All that changes while the editor runs, in one place (the sections below read and write it).
const state = {
  // popup
  open: false,       // popup shown
  items: [],         // [{text, logprob}] offered, shortest first within each round
  active: -1,        // highlighted option
  round: 0,          // Tab presses on the same text: each asks for more and longer
  seq: 0,            // request counter; answers to older requests are dropped
  pending: false,    // a request is in flight
  snapshot: null,    // {text, start, end} when the popup opened; insertion goes there
  accepting: false,  // a partial accept (Ctrl+Right) is inserting: the popup stays open
  // marks: character ranges [start, end) inserted from a suggestion (machine-written text)
  marks: [],
  pendingMark: null, // set just before our own insertion; applied by the input handler
  lastValue: "",     // the text before the latest edit, to move the marks along with it
  // draft and pre-computation
  draftTimer: null,  // the draft is kept shortly after typing stops
  pauseTimer: null,  // a pause in typing starts a pre-computation
  prefetching: false, // a pre-computation is in flight
  prefetchSeq: 0,    // pre-computation counter; only the newest one clears `prefetching`
  composing: false,  // an IME (Chinese input) is composing: its text is not the writer's yet
  // documents
  current: readStore(CURRENT_KEY, { id: null, owner_key: null }), // {id, owner_key} being edited
  savedText: null,   // text as last saved or loaded, to know when there is unsaved work
  readOnly: false,   // a shared document opened by its link
};

function readStore(key, fallback) {
  try {
    const raw = window.localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (e) { return fallback; } // storage disabled or garbled: the editor still works
}
function writeStore(key, value) {
  try { window.localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* full or disabled */ }
}

// ---- marks: character ranges [start, end) inserted from a suggestion (machine-written text)
const backdrop = element.querySelector(".tw-backdrop");

function mergeMarks(list) {
  const sorted = list.filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out = [];
  for (const [a, b] of sorted) {
    if (out.length && a <= out[out.length - 1][1]) out[out.length - 1][1] = Math.max(out[out.length - 1][1], b);
    else out.push([a, b]);
  }
  return out;
}

// Move the marks along with an edit; text the writer changes inside a mark becomes their own.
function shiftMarks(oldValue, newValue) {
  if (oldValue === newValue) return;
  const max = Math.min(oldValue.length, newValue.length);
  let p = 0;
  while (p < max && oldValue[p] === newValue[p]) p++;
  let s = 0;
  while (s < max - p && oldValue[oldValue.length - 1 - s] === newValue[newValue.length - 1 - s]) s++;
  const oldEnd = oldValue.length - s;
  const newEnd = newValue.length - s;
  const delta = newEnd - oldEnd;
  const out = [];
  for (const [a, b] of state.marks) {
    if (b <= p) out.push([a, b]);
    else if (a >= oldEnd) out.push([a + delta, b + delta]);
    else {
      if (a < p) out.push([a, p]);
      if (b > oldEnd) out.push([newEnd, b + delta]);
    }
  }
  state.marks = mergeMarks(out);
}

function syncBackdrop() {
  const style = getComputedStyle(area);
  for (const prop of MIRRORED) backdrop.style[prop] = style[prop];
  const scrollbar = area.offsetWidth - area.clientWidth - parseFloat(style.borderLeftWidth) - parseFloat(style.borderRightWidth);
  Object.assign(backdrop.style, {
    width: `${area.offsetWidth}px`, height: `${area.offsetHeight}px`, borderColor: "transparent",
    paddingRight: `${parseFloat(style.paddingRight) + Math.max(0, scrollbar)}px`,
  });
  backdrop.scrollTop = area.scrollTop;
}

function renderMarks() {
  // Built from text nodes: document text is never parsed as HTML.
  const text = area.value;
  const nodes = [];
  let at = 0;
  for (const [a, b] of state.marks) {
    if (a > at) nodes.push(document.createTextNode(text.slice(at, a)));
    const mark = document.createElement("mark");
    mark.className = "tw-machine";
    mark.textContent = text.slice(a, b);
    nodes.push(mark);
    at = b;
  }
  nodes.push(document.createTextNode(text.slice(at) + "\n"));
  backdrop.replaceChildren(...nodes);
  syncBackdrop();
}

// ---- draft kept across page reloads (nothing leaves the browser for this)
function keepDraft() {
  if (state.readOnly) return; // a shared document being read is not this browser's draft
  clearTimeout(state.draftTimer);
  state.draftTimer = setTimeout(() => {
    try { window.localStorage.setItem(DRAFT_KEY, area.value); } catch (e) { /* full or disabled */ }
    writeStore(MARKS_KEY, state.marks);
  }, 250);
}
try {
  const saved = window.localStorage.getItem(DRAFT_KEY);
  if (saved && !area.value) {
    area.value = saved;
    state.marks = mergeMarks(readStore(MARKS_KEY, []).filter((m) => Array.isArray(m) && m[1] <= saved.length));
  }
} catch (e) { /* storage disabled: the editor still works */ }
state.lastValue = area.value;

function snapshotNow() {
  return { text: area.value, start: area.selectionStart, end: area.selectionEnd };
}
function unchangedSince(snap) {
  return !!snap && snap.text === area.value && snap.start === area.selectionStart && snap.end === area.selectionEnd;
}

// ---- caret position in pixels, via a hidden mirror of the textarea (the usual technique)
const MIRRORED = ["boxSizing", "width", "height", "overflowX", "overflowY", "borderTopWidth", "borderRightWidth",
  "borderBottomWidth", "borderLeftWidth", "paddingTop", "paddingRight", "paddingBottom", "paddingLeft",
  "fontStyle", "fontVariant", "fontWeight", "fontStretch", "fontSize", "lineHeight", "fontFamily",
  "textAlign", "textTransform", "textIndent", "letterSpacing", "wordSpacing", "tabSize", "whiteSpace", "wordBreak", "overflowWrap"];
function caretPixels(position) {
  const mirror = document.createElement("div");
  const style = getComputedStyle(area);
  for (const prop of MIRRORED) mirror.style[prop] = style[prop];
  Object.assign(mirror.style, { position: "absolute", visibility: "hidden", whiteSpace: "pre-wrap", wordWrap: "break-word", top: "0", left: "-9999px" });
  mirror.textContent = area.value.slice(0, position);
  const marker = document.createElement("span");
  marker.textContent = area.value.slice(position) || ".";
  mirror.appendChild(marker);
  document.body.appendChild(mirror);
  const lineHeight = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.4;
  const result = { left: marker.offsetLeft, top: marker.offsetTop + lineHeight };
  document.body.removeChild(mirror);
  return result;
}

function placePopup() {
  const caret = caretPixels(area.selectionStart);
  const top = area.offsetTop + caret.top - area.scrollTop + 4;
  const maxLeft = Math.max(0, area.offsetLeft + area.clientWidth - Math.min(popup.offsetWidth || 300, area.clientWidth));
  popup.style.top = `${Math.min(top, area.offsetTop + area.offsetHeight)}px`;
  popup.style.left = `${Math.min(area.offsetLeft + caret.left, maxLeft)}px`;
}

// ---- popup
function setPopupStatus(text, kind) {
  popupStatus.textContent = text || "";
  popupStatus.classList.toggle("tw-busy", kind === "busy");
  popupStatus.classList.toggle("tw-error", kind === "error");
}
function setStatus(text, isError) {
  statusLine.textContent = text || "";
  statusLine.classList.toggle("tw-error", !!isError);
}

function render() {
  // Model output is shown with textContent only: it is never parsed as HTML.
  const nodes = state.items.map((item, i) => {
    const option = document.createElement("div");
    option.className = "tw-option";
    option.id = `tw-option-${i}`;
    option.setAttribute("role", "option");
    option.setAttribute("aria-selected", i === state.active ? "true" : "false");
    const text = document.createElement("span");
    text.className = "tw-option-text";
    text.textContent = item.text.replace(/^[ \t]+/, ""); // the space it starts with is implied
    const conf = document.createElement("span");
    conf.className = "tw-conf";
    const confidence = Math.exp(Math.max(-6, Math.min(0, item.logprob || 0)));
    conf.title = `mean token probability ${(confidence * 100).toFixed(0)}%`;
    conf.hidden = item.logprob === null; // a model server that reports no probabilities
    const bar = document.createElement("span");
    bar.style.width = `${Math.round(confidence * 100)}%`;
    conf.appendChild(bar);
    option.append(text, conf);
    option.addEventListener("mousedown", (e) => e.preventDefault()); // keep focus in the text area
    option.addEventListener("click", () => insert(i));
    return option;
  });
  optionsBox.replaceChildren(...nodes);
  if (state.active >= 0 && nodes[state.active]) {
    area.setAttribute("aria-activedescendant", nodes[state.active].id);
    nodes[state.active].scrollIntoView({ block: "nearest" });
  } else {
    area.removeAttribute("aria-activedescendant");
  }
}

function openPopup() {
  state.open = true;
  state.items = [];
  state.active = -1;
  state.round = 0;
  state.snapshot = snapshotNow();
  render();
  popup.hidden = false;
  area.setAttribute("aria-expanded", "true");
  placePopup();
}

function closePopup() {
  if (state.pending) {
    // Free the model for the next request instead of finishing one nobody will read.
    server.cancel_suggestions({}).catch(() => {});
  }
  state.seq += 1;
  state.pending = false;
  state.open = false;
  state.items = [];
  state.active = -1;
  popup.hidden = true;
  optionsBox.replaceChildren();
  setPopupStatus("");
  area.setAttribute("aria-expanded", "false");
  area.removeAttribute("aria-activedescendant");
}

// Suggestions of the current round shown so far (the rest of state.items are earlier rounds).
function showRound(base, suggestions) {
  const known = new Set(state.items.slice(0, base).map((item) => item.text));
  const fresh = [];
  for (const item of suggestions || []) {
    if (!known.has(item.text)) { fresh.push(item); known.add(item.text); }
  }
  state.items = state.items.slice(0, base).concat(fresh);
  if (state.active < 0 && state.items.length) state.active = 0;
  if (state.active >= state.items.length) state.active = state.items.length - 1;
  render();
  placePopup();
}

// The end of the text a press sends: the model reads at most ~2048 tokens, and the server takes
// at most 65536 characters (editor/service.py MAX_PROMPT_CHARS). Cut in steps of 8192 from the
// start, as models/textcut.py tail() does, so the window stays put while the writer types.
const PROMPT_CHARS = 65536, PROMPT_STEP = 8192;
function tail(text) {
  if (text.length <= PROMPT_CHARS) return text;
  return text.slice(Math.ceil((text.length - PROMPT_CHARS) / PROMPT_STEP) * PROMPT_STEP);
}

// The text after the caret, sent with each request so that the engine ranks first the
// candidates that fit what follows. Only its start matters (the server reads at most 2000
// characters: editor/service.py MAX_AFTER_CHARS), so cut at the end, never inside a surrogate pair.
const AFTER_CHARS = 2000;
function following(text, at) {
  const after = text.slice(at, at + AFTER_CHARS);
  return /[\uD800-\uDBFF]$/.test(after) ? after.slice(0, -1) : after;
}

// Streaming: while the request runs, poll for the rows already finished (the shortest
// suggestion is usually ready long before the longest) and show them in place.
// Each poll waits on the server until a row more is ready (or the press ends, or 1.5 s), so a
// row shows a round trip after it is ready: polled every 120 ms, ~60 ms later on average.
function followProgress(seq, prompt, round, base) {
  let seen = 0;
  const poll = async () => {
    if (seq !== state.seq || !state.pending) return;
    const asked = performance.now();
    let news = false;
    try {
      const progress = await server.suggestion_progress({ seq, seen, wait: true });
      if (seq !== state.seq || !state.pending) return;
      if (progress && progress.seq === seq && progress.round === round && progress.suggestions && progress.suggestions.length > seen) {
        seen = progress.suggestions.length;
        news = true;
        showRound(base, progress.suggestions);
      }
    } catch (e) { /* the final answer will tell */ }
    // Answered at once with nothing new (the server had too many polls of this page waiting): pace it.
    setTimeout(poll, news || performance.now() - asked > 100 ? 0 : 120);
  };
  poll();
}

async function requestSuggestions() {
  const snap = state.snapshot;
  const seq = ++state.seq;
  const prompt = snap.text.slice(0, snap.start);
  const base = state.items.length;
  state.pending = true;
  setPopupStatus(state.round ? "Asking for more and longer…" : "Thinking…", "busy");
  followProgress(seq, prompt, state.round, base);
  let answer;
  try {
    answer = await server.suggest_for_editor({ text: tail(prompt), after: following(snap.text, snap.end), round: state.round, seq });
  } catch (e) {
    answer = { error: "The server did not answer. Is tabwrite still running?" };
  }
  if (seq !== state.seq || !state.open) return; // superseded, cancelled or closed meanwhile
  state.pending = false;
  if (!answer || answer.error) {
    const message = (answer && answer.error) || "No answer from the server.";
    setPopupStatus(message, "error");
    setStatus(message, true);
    return;
  }
  showRound(base, answer.suggestions);
  setPopupStatus(answer.message || (state.items.length ? "" : "No suggestions."), answer.message && !state.items.length ? "error" : "");
  const rate = answer.tokens && answer.elapsed_ms && !answer.from_cache ? ` · ${Math.round((answer.tokens * 1000) / answer.elapsed_ms)} tokens/s` : "";
  setStatus(
    `${answer.model} (${answer.device}) · ${answer.elapsed_ms} ms${rate}` +
    (answer.from_cache ? " · pre-computed while you paused" : "") +
    (answer.truncated ? " · using the end of the document" : ""),
    false,
  );
}

// The suggestion as it goes in at the caret: no double space when the writer already typed one.
function fitToCaret(text, snap) {
  return /\s$/.test(snap.text.slice(0, snap.start)) && /^[ \t]/.test(text) ? text.replace(/^[ \t]+/, "") : text;
}

function insert(index) {
  const item = state.items[index];
  const snap = state.snapshot;
  if (!item || !snap) return;
  area.focus();
  area.setSelectionRange(snap.start, snap.end);
  const text = fitToCaret(item.text, snap);
  closePopup();
  insertAt(snap.start, snap.end, text, true);
}

// Replace [start, end) with text as one undoable edit; machine text gets marked.
function insertAt(start, end, text, machine) {
  area.focus();
  area.setSelectionRange(start, end);
  state.pendingMark = machine ? [start, start + text.length] : null;
  // execCommand keeps the browser's own undo stack (Ctrl+Z undoes the insertion as one step).
  const done = document.execCommand && document.execCommand("insertText", false, text);
  if (!done) {
    area.setRangeText(text, start, end, "end");
    area.dispatchEvent(new Event("input", { bubbles: true }));
  }
}

// Accept the first word (or CJK character) of the highlighted suggestion; keep the rest offered.
const FIRST_CHUNK = /^\s*(?:[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff][\u3000-\u303f\uff00-\uffef]*|[^\s\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]+)/;
function acceptChunk() {
  const item = state.items[state.active];
  const snap = state.snapshot;
  if (!item || !snap) return;
  const text = fitToCaret(item.text, snap);
  const match = text.match(FIRST_CHUNK);
  const chunk = match ? match[0] : text;
  const rest = text.slice(chunk.length);
  state.accepting = true;
  insertAt(snap.start, snap.end, chunk, true);
  state.accepting = false;
  if (!rest.trim()) { closePopup(); return; }
  // The other suggestions that agree with what was accepted stay offered too.
  const remaining = [];
  for (const other of state.items) {
    const t = fitToCaret(other.text, snap);
    if (other === item) remaining.unshift({ ...other, text: rest });
    else if (t.startsWith(chunk) && t.slice(chunk.length).trim()) remaining.push({ ...other, text: t.slice(chunk.length) });
  }
  state.items = remaining;
  state.active = 0;
  state.snapshot = snapshotNow();
  render();
  placePopup();
}

area.addEventListener("keydown", (e) => {
  if (state.composing || e.isComposing || e.keyCode === 229) return; // an IME (Chinese input) owns the keys
  if ((e.ctrlKey || e.metaKey) && (e.key === "s" || e.key === "S")) {
    e.preventDefault();
    saveDocument();
    return;
  }
  if (state.readOnly) return;
  if (state.open && e.key === "ArrowRight" && (e.ctrlKey || e.metaKey) && state.items.length && state.active >= 0) {
    e.preventDefault();
    acceptChunk();
    return;
  }
  if (e.key === "Tab" && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey) {
    e.preventDefault();
    if (state.open && unchangedSince(state.snapshot)) {
      state.round += 1; // Tab again: more and longer
    } else {
      openPopup();
    }
    requestSuggestions();
    return;
  }
  if (e.key === "Tab") { closePopup(); return; } // Shift+Tab: default, focus leaves the editor
  if (!state.open) return;
  const count = state.items.length;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    e.preventDefault();
    if (count) {
      const delta = e.key === "ArrowDown" ? 1 : -1;
      state.active = state.active < 0 ? 0 : (state.active + delta + count) % count;
      render();
    }
  } else if (e.key === "Enter" && count && state.active >= 0) {
    e.preventDefault();
    insert(state.active);
  } else if (e.key === "Escape") {
    e.preventDefault();
    e.stopPropagation();
    closePopup();
  } else if (["ArrowLeft", "ArrowRight", "Home", "End", "PageUp", "PageDown"].includes(e.key)) {
    closePopup(); // the caret moves away from where the suggestions belong
  }
});
// Pre-computation: when the writer pauses, ask for the suggestions at the caret already,
// so the Tab that often follows a pause is answered at once. Typing again cancels it.
const PAUSE_MS = 600;
// Typing again (or starting to compose) makes a pending or running pre-computation useless.
function stopPrefetch() {
  clearTimeout(state.pauseTimer);
  state.pauseTimer = null;
  if (state.prefetching) {
    state.prefetching = false;
    server.cancel_suggestions({}).catch(() => {});
  }
}
// Whether the caret is inside a line: text (not just spaces) follows it before the line ends.
// A writer there is revising rather than continuing: a pause there seldom ends in Tab, and
// pre-computing would spend the model's time for nothing. A Tab there still asks as usual.
function midLine(text, at) {
  const end = text.indexOf("\n", at);
  return !!text.slice(at, end < 0 ? text.length : end).trim();
}
function schedulePrefetch() {
  stopPrefetch();
  if (state.composing) return; // unfinished pinyin is not text to continue
  state.pauseTimer = setTimeout(() => {
    state.pauseTimer = null;
    if (state.open || state.composing || document.activeElement !== area || area.selectionStart !== area.selectionEnd) return;
    const text = area.value, caret = area.selectionStart;
    const prompt = text.slice(0, caret);
    if (!prompt.trim() || midLine(text, caret)) return;
    const mine = ++state.prefetchSeq;
    state.prefetching = true;
    // The same `after` as the Tab at this caret will send: the server's pre-computed answer is
    // kept for exactly that text and what follows it.
    server.suggest_for_editor({ text: tail(prompt), after: following(text, caret), round: 0, prefetch: true })
      .catch(() => {})
      .finally(() => { if (mine === state.prefetchSeq) state.prefetching = false; });
  }, PAUSE_MS);
}

// IME composition (pinyin and the like): while the writer picks characters, the text changes
// with every key but none of it is meant yet, so nothing is pre-computed and Tab belongs to the
// IME. What the IME commits counts as typing: the pause timer starts at compositionend.
area.addEventListener("compositionstart", () => {
  state.composing = true;
  stopPrefetch();
});
area.addEventListener("compositionend", () => {
  state.composing = false;
  schedulePrefetch();
});

area.addEventListener("input", (e) => {
  shiftMarks(state.lastValue, area.value);
  state.lastValue = area.value;
  if (state.pendingMark) {
    state.marks = mergeMarks(state.marks.concat([state.pendingMark]));
    state.pendingMark = null;
  }
  renderMarks();
  keepDraft();
  if (state.accepting) return; // a partial accept keeps the popup open
  if (state.open) closePopup(); // typing dismisses (and cancels) the suggestions
  if (state.composing || e.isComposing) { stopPrefetch(); return; } // compositionend schedules it
  schedulePrefetch();
});
area.addEventListener("mousedown", () => { if (state.open) closePopup(); });
area.addEventListener("blur", () => {
  // Leaving the text area ends a composition; should a browser not say so, Tab is not lost for good.
  state.composing = false;
  if (state.open) closePopup();
});
window.addEventListener("resize", () => { if (state.open) placePopup(); });
area.addEventListener("scroll", () => {
  backdrop.scrollTop = area.scrollTop;
  if (state.open) placePopup();
});
new ResizeObserver(() => syncBackdrop()).observe(area);
renderMarks();

// ---- perplexity view: the document scored by the model, each token coloured by its rank
const scoreButton = element.querySelector(".tw-score-button");
const scoreSummary = element.querySelector(".tw-score-summary");
const scoreView = element.querySelector(".tw-score-view");
const scoreTip = element.querySelector(".tw-score-tip");
const scored = { text: null, offset: 0, tokens: [] };

function rankClass(rank) {
  if (rank === null || rank === undefined) return "";
  return rank <= 10 ? "tw-r10" : rank <= 100 ? "tw-r100" : rank <= 1000 ? "tw-r1000" : "tw-rmore";
}
function percent(p) { return p === null || p === undefined ? "–" : `${(p * 100).toFixed(p < 0.01 ? 2 : 1)}%`; }

async function scoreDocument() {
  const text = area.value;
  scoreTip.hidden = true;
  scoreButton.disabled = true;
  scoreSummary.textContent = "Scoring…";
  let polling = true;
  const poll = async () => {
    if (!polling) return;
    try {
      const progress = await server.suggestion_progress({});
      if (polling && progress && progress.score_progress !== null && progress.score_progress !== undefined) {
        scoreSummary.textContent = `Scoring… ${Math.round(progress.score_progress * 100)}%`;
      }
    } catch (e) { /* the answer will tell */ }
    if (polling) setTimeout(poll, 250);
  };
  setTimeout(poll, 250);
  let answer;
  try {
    answer = await server.score_for_editor({ text });
  } catch (e) {
    answer = { error: "The server did not answer." };
  }
  polling = false;
  scoreButton.disabled = false;
  if (!answer || answer.error) {
    scoreSummary.textContent = (answer && answer.error) || "Scoring failed.";
    scoreView.hidden = true;
    return;
  }
  Object.assign(scored, { text, offset: answer.text_offset || 0, tokens: answer.tokens });
  scoreSummary.textContent =
    `perplexity ${answer.perplexity.toFixed(1)} · ${answer.bits_per_char.toFixed(3)} bits/char · ${answer.token_count} tokens` +
    (answer.truncated ? " (the end of the document)" : "") + ` · ${answer.model}`;
  // Token text is model-facing document text: set with textContent, never parsed as HTML.
  const nodes = answer.tokens.map((token, i) => {
    const span = document.createElement("span");
    span.className = `tw-tok ${rankClass(token.rank)}`;
    span.textContent = token.text;
    span.dataset.index = String(i);
    return span;
  });
  scoreView.replaceChildren(...nodes);
  scoreView.hidden = false;
}

function showTip(span) {
  const token = scored.tokens[Number(span.dataset.index)];
  if (!token) return;
  const head = document.createElement("div");
  const shown = JSON.stringify(token.text);
  head.textContent = token.rank ? `${shown}: p = ${percent(token.prob)} · rank ${token.rank}`
    : token.rank_above ? `${shown}: p = ${percent(token.prob)} · rank > ${token.rank_above}` // a server lists only the top few
    : `${shown}: first token (no context)`;
  const items = (token.alternatives || []).map((alt) => {
    const button = document.createElement("button");
    button.type = "button";
    const label = document.createElement("span");
    label.textContent = JSON.stringify(alt.text).slice(1, -1); // shows spaces and newlines
    const prob = document.createElement("span");
    prob.textContent = percent(alt.prob);
    button.append(label, prob);
    button.addEventListener("click", () => replaceToken(token, alt.text));
    return button;
  });
  scoreTip.replaceChildren(head, ...items);
  const box = span.getBoundingClientRect();
  const parent = scoreTip.parentElement.getBoundingClientRect();
  scoreTip.style.left = `${Math.max(0, box.left - parent.left)}px`;
  scoreTip.style.top = `${box.bottom - parent.top + 4}px`;
  scoreTip.hidden = false;
}

function replaceToken(token, replacement) {
  const start = scored.offset + token.start;
  const end = scored.offset + token.end;
  if (area.value !== scored.text || area.value.slice(start, end) !== token.text) {
    scoreSummary.textContent = "The text changed since it was scored: score it again.";
    return;
  }
  insertAt(start, end, replacement, false);
  scoreTip.hidden = true;
  scoreDocument();
}

scoreButton.addEventListener("click", scoreDocument);
scoreView.addEventListener("click", (e) => {
  const span = e.target.closest(".tw-tok");
  if (span) showTip(span);
});
scoreView.addEventListener("mouseover", (e) => {
  const span = e.target.closest(".tw-tok");
  if (span) showTip(span);
});
scoreView.addEventListener("scroll", () => { scoreTip.hidden = true; });
document.addEventListener("mousedown", (e) => {
  if (!scoreTip.hidden && !scoreTip.contains(e.target) && !scoreView.contains(e.target)) scoreTip.hidden = true;
});

// ---- documents: save (Ctrl+S), share a read-only link, my documents, export
const docStatus = element.querySelector(".tw-doc-status");
const myDocs = element.querySelector(".tw-mydocs");
const banner = element.querySelector(".tw-readonly-banner");

// The document being edited: its id, owner key and the version its text is based on (sent
// with every save: if another tab or window saved it since, the server refuses and says so).
// Local storage keeps one draft for all tabs: it keeps the document of the tab whose text the
// draft is (the tab that last typed, opened or restored it), so that after a reload a save
// is checked against the version that text was based on, never another tab's.
const DRAFT_TAB_KEY = "tabwrite:draft-tab";
const TAB_ID = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
state.conflict = null; // id of the document whose save was refused as a conflict: Save again makes a new one

function ownsDraft() {
  try {
    const tab = window.localStorage.getItem(DRAFT_TAB_KEY);
    return tab === null || tab === TAB_ID;
  } catch (e) { return true; }
}
function claimDraft() {
  if (state.readOnly) return;
  try { window.localStorage.setItem(DRAFT_TAB_KEY, TAB_ID); } catch (e) { /* storage disabled */ }
  writeStore(CURRENT_KEY, state.current);
}
function setCurrent(id, ownerKey, version) {
  state.current = { id, owner_key: ownerKey, version: Number.isInteger(version) ? version : null };
  if (ownsDraft()) writeStore(CURRENT_KEY, state.current);
}
if (!new URLSearchParams(window.location.search).get("doc")) claimDraft(); // this tab shows the draft now
area.addEventListener("input", claimDraft);

function setReadOnly(flag) {
  state.readOnly = flag;
  area.readOnly = flag;
  banner.hidden = !flag;
}

function say(text, link) {
  docStatus.replaceChildren(document.createTextNode(text));
  if (link) {
    const a = document.createElement("a");
    a.href = link;
    a.textContent = link;
    a.className = "tw-share-link";
    a.target = "_blank";
    a.rel = "noopener";
    docStatus.append(" ", a);
  }
}

function remember(doc) {
  const docs = readStore(DOCS_KEY, []).filter((d) => d && d.id !== doc.id);
  docs.unshift({ id: doc.id, owner_key: doc.owner_key });
  writeStore(DOCS_KEY, docs.slice(0, 200));
}

// Saves run one after another, each with the version the one before returned (two quick
// Ctrl+S in one tab are not a conflict).
let saving = Promise.resolve();
function saveDocument() {
  const run = saving.then(saveNow, saveNow);
  saving = run.catch(() => null);
  return run;
}

async function saveNow() {
  if (state.readOnly) { say("This shared document is read-only: use “Edit a copy” first."); return null; }
  say("Saving…");
  // After a conflict, saving again keeps this text as a new document; the other one stays as it is.
  const asNew = state.conflict !== null && state.conflict === state.current.id;
  const target = asNew ? { id: null, owner_key: null, version: null } : state.current;
  const text = area.value;
  let answer;
  try {
    answer = await server.save_document({
      text, marks: state.marks, id: target.id, owner_key: target.owner_key,
      version: Number.isInteger(target.version) ? target.version : null,
    });
  } catch (e) {
    answer = { error: "The server did not answer; your text is still here and in this browser." };
  }
  if (!answer || answer.error) {
    if (answer && answer.conflict) {
      state.conflict = state.current.id;
      say(`${answer.error} Your text is still here: Save again keeps it as a new document.`);
    } else {
      say((answer && answer.error) || "Saving failed; your text is still here.");
    }
    return null;
  }
  state.conflict = null;
  setCurrent(answer.id, answer.owner_key, answer.version);
  remember(state.current);
  state.savedText = text;
  const time = new Date().toLocaleTimeString();
  say(asNew ? `Saved as a new document at ${time}; the other version is still in “My documents”.` : `Saved at ${time}.`);
  return answer;
}

function shareUrl(id) {
  return `${window.location.origin}${window.location.pathname}?doc=${encodeURIComponent(id)}`;
}

function showDocument(doc, editable) {
  closePopup();
  area.value = doc.text;
  state.lastValue = area.value;
  state.marks = mergeMarks((doc.marks || []).filter((m) => Array.isArray(m) && m[1] <= doc.text.length));
  state.savedText = doc.text;
  renderMarks();
  setReadOnly(!editable);
  if (editable) keepDraft();
}

// Before another document replaces the text: true when nothing unsaved would be lost.
async function saveIfChanged() {
  if (state.readOnly || !area.value.trim() || area.value === state.savedText) return true;
  return (await saveDocument()) !== null;
}

async function refreshMyDocs() {
  const docs = readStore(DOCS_KEY, []);
  let list = [];
  try { list = await server.list_documents({ ids: docs.map((d) => d.id) }); } catch (e) { /* offline */ }
  const first = myDocs.options[0];
  const options = (list || []).map((d) => {
    const option = document.createElement("option");
    option.value = d.id;
    option.textContent = `${d.title} — ${new Date(d.updated * 1000).toLocaleString()}`;
    return option;
  });
  myDocs.replaceChildren(first, ...options);
}

element.querySelector(".tw-save").addEventListener("click", saveDocument);
element.querySelector(".tw-share").addEventListener("click", async () => {
  const answer = state.readOnly ? state.current : await saveDocument();
  const id = state.readOnly ? new URLSearchParams(window.location.search).get("doc") : answer && answer.id;
  if (!id) return;
  const url = shareUrl(id);
  try { await navigator.clipboard.writeText(url); say("Link copied (read-only):", url); } catch (e) { say("Read-only link:", url); }
});
element.querySelector(".tw-new").addEventListener("click", async () => {
  if (!(await saveIfChanged())) return; // not saved (the status says why): the text stays
  setCurrent(null, null, null);
  showDocument({ text: "", marks: [] }, true);
  claimDraft();
  say("New document.");
  area.focus();
});
myDocs.addEventListener("focus", refreshMyDocs);
myDocs.addEventListener("mousedown", refreshMyDocs);
myDocs.addEventListener("change", async () => {
  const id = myDocs.value;
  myDocs.value = "";
  if (!id) return;
  if (!(await saveIfChanged())) return; // not saved (the status says why): the text stays
  const own = readStore(DOCS_KEY, []).find((d) => d.id === id);
  let doc;
  try { doc = await server.load_document({ id }); } catch (e) { doc = { error: "The server did not answer." }; }
  if (!doc || doc.error) { say((doc && doc.error) || "Loading failed."); return; }
  state.conflict = null;
  setCurrent(id, own ? own.owner_key : null, doc.version);
  showDocument(doc, true);
  claimDraft();
  say("Opened.");
});
element.querySelector(".tw-copy-shared").addEventListener("click", () => {
  setCurrent(null, null, null);
  setReadOnly(false);
  claimDraft();
  state.savedText = null;
  window.history.replaceState(null, "", window.location.pathname);
  keepDraft();
  say("Editing your own copy; Save keeps it.");
  area.focus();
});

function download(extension, body) {
  const title = (area.value.trim().split("\n")[0] || "tabwrite").slice(0, 60).replace(/[^\p{L}\p{N} _-]+/gu, "").trim() || "tabwrite";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body], { type: extension === "md" ? "text/markdown" : "text/plain" }));
  link.download = `${title}.${extension}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
element.querySelector(".tw-export-txt").addEventListener("click", () => download("txt", area.value));
element.querySelector(".tw-export-md").addEventListener("click", () => download("md", area.value));

// A share link (?doc=ID) opens a read-only copy; the writer's own draft stays untouched.
(async () => {
  const shared = new URLSearchParams(window.location.search).get("doc");
  if (!shared) return;
  let doc;
  try { doc = await server.load_document({ id: shared }); } catch (e) { doc = { error: "The server did not answer." }; }
  if (!doc || doc.error) { say((doc && doc.error) || "Could not open the shared document."); return; }
  showDocument(doc, false);
  say("Shared document (read-only).");
})();
