// Job progress: while a job runs, fetch its progress fragment and swap it in, until it ends.
(function () {
  "use strict";
  function poll(box) {
    var url = box.getAttribute("data-poll");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
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
      .catch(function () { window.setTimeout(function () { poll(box); }, 5000); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector("[data-poll]");
    if (box) { window.setTimeout(function () { poll(box); }, 1000); }
  });
})();
