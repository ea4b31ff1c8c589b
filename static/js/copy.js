// Copy buttons (docs/live-updates.md): <button type="button" class="copy-button"
// data-copy-target="ID">Copy</button> copies the text of the element with that id.
//
// Uses the asynchronous clipboard where the page may (a secure context: HTTPS or
// localhost); otherwise selects the text and asks the browser to copy it, and when even
// that is refused, leaves the text selected and says to press Ctrl+C. One listener on the
// document, so buttons that live.js swaps in work too. The buttons are hidden without
// JavaScript (CSS: .copy-button shows only under html.js-copy).
(() => {
  "use strict";

  document.documentElement.classList.add("js-copy");
  const FEEDBACK_MS = 2000;

  function selectText(node) {
    const range = document.createRange();
    range.selectNodeContents(node);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function copyBySelection(node) {
    selectText(node);
    try {
      return document.execCommand("copy");
    } catch (error) {
      return false;
    }
  }

  function tell(button, text) {
    const announcer = document.querySelector("[data-live-announce]");
    if (announcer) {
      announcer.textContent = "";
      window.setTimeout(() => {
        announcer.textContent = text;
      }, 50);
    }
    if (!button.dataset.label) button.dataset.label = button.textContent;
    button.textContent = text.startsWith("Copied") ? "Copied" : "Press Ctrl+C";
    window.clearTimeout(Number(button.dataset.timer || 0));
    button.dataset.timer = String(
      window.setTimeout(() => {
        button.textContent = button.dataset.label;
      }, FEEDBACK_MS),
    );
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-copy-target]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copyTarget);
    if (!source) return;
    const text = source.textContent.trim();
    let copied = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        copied = true;
      } catch (error) {
        copied = false; // denied: fall back to the selection
      }
    }
    if (!copied) copied = copyBySelection(source);
    if (!copied) selectText(source);
    tell(button, copied ? "Copied to the clipboard." : "Selected: press Ctrl+C to copy.");
  });
})();
