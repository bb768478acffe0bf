// Job progress: while a job runs, fetch its progress fragment and swap it in, until it ends.
// Signed out: go on to Microsoft's sign-out (a link, so it works without script too).
(function () {
  "use strict";
  function poll(box) {
    var url = box.getAttribute("data-poll");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" }, redirect: "manual" })
      .then(function (response) {
        if (response.status === 401 || response.type === "opaqueredirect") {
          // The session ended or its roles must be read again: the page itself signs in again.
          window.location.reload();
          return Promise.reject("reloading");
        }
        return response.ok ? response.text() : Promise.reject(response.status);
      })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.body;
        box.replaceChildren.apply(box, Array.prototype.slice.call(fresh.childNodes));
        var status = box.querySelector("[data-status]");
        var state = status ? status.getAttribute("data-status") : "";
        if (state === "queued" || state === "running") {
          window.setTimeout(function () { poll(box); }, 1500);
        } else {
          box.removeAttribute("data-poll");
        }
      })
      .catch(function (reason) {
        if (reason !== "reloading") { window.setTimeout(function () { poll(box); }, 5000); }
      });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector("[data-poll]");
    if (box) { window.setTimeout(function () { poll(box); }, 1000); }
    var onward = document.querySelector("a[data-continue]");
    if (onward) { window.location.replace(onward.getAttribute("href")); }
  });
})();
