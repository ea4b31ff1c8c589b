// Before a form is sent (one listener on the document, so forms that live.js swaps in
// work too; no inline handler, so the Content-Security-Policy needs no inline script):
//
// - <form data-confirm="Reset vm1 to its baseline?"> (templates/labs/_vm_op.html) asks
//   that question first, and Cancel keeps the form from being sent. Without JavaScript
//   the form is sent unasked.
// - A POST form without a CSRF token gets the page's own, from <meta name="csrf-token">
//   (templates/base.html): the live regions are rendered once for everyone who sees them
//   (labs/live/regions.py), so the forms in them carry no token of anyone's.
(() => {
  "use strict";

  function addToken(form) {
    if ((form.getAttribute("method") || "get").toLowerCase() !== "post") return;
    if (form.querySelector('input[name="csrfmiddlewaretoken"]')) return;
    const meta = document.querySelector('meta[name="csrf-token"]');
    if (!meta || !meta.content) return;
    const input = document.createElement("input");
    input.type = "hidden";
    input.name = "csrfmiddlewaretoken";
    input.value = meta.content;
    form.append(input);
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      return;
    }
    addToken(form);
  });
})();
