// Confirmation before a form that destroys something is sent (templates/labs/_vm_op.html):
// <form data-confirm="Reset vm1 to its baseline?"> asks that question first, and Cancel
// keeps the form from being sent. One listener on the document, so forms that live.js
// swaps in work too; no inline handler, so the Content-Security-Policy (portal/settings.py,
// SECURE_CSP) needs no inline script. Without JavaScript the form is sent unasked.
(() => {
  "use strict";

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
})();
