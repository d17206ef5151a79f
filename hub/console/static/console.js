// customs-edge console: new alerts appear live (server-sent events) with a sound the officer can mute.
"use strict";
(function () {
  var muted = localStorage.getItem("ce-muted") === "1";
  var btn = document.getElementById("mute");
  function label() { if (btn) { btn.textContent = muted ? "Sound off" : "Sound on"; } }
  label();
  if (btn) {
    btn.addEventListener("click", function () {
      muted = !muted; localStorage.setItem("ce-muted", muted ? "1" : "0"); label();
    });
  }
  var ctx = null;
  function beep() {
    if (muted) { return; }
    try {
      ctx = ctx || new (window.AudioContext || window.webkitAudioContext)();
      var o = ctx.createOscillator(), g = ctx.createGain();
      o.frequency.value = 880; g.gain.value = 0.2; o.connect(g); g.connect(ctx.destination);
      o.start(); o.stop(ctx.currentTime + 0.25);
    } catch (err) { /* no audio on this device */ }
  }
  window.ceBeeps = 0;
  window.ceSnaps = 0;
  var snap = document.getElementById("snap");
  if (snap && window.EventSource) {
    var dev = snap.getAttribute("data-device");
    var view = new EventSource(snap.getAttribute("data-events"));
    view.addEventListener("snapshot", function (ev) {
      var msg = JSON.parse(ev.data);
      snap.src = "/snapshot/" + dev + ".jpg?n=" + msg.n;
      window.ceSnaps += 1;
      document.getElementById("view-state").textContent = "Snapshot " + msg.n + " at " + msg.at;
    });
  }
  var table = document.getElementById("alerts");
  if (!table || !window.EventSource) { return; }
  var body = table.querySelector("tbody");
  var url = table.getAttribute("data-events");
  var after = table.getAttribute("data-after");
  var src = new EventSource(url + (url.indexOf("?") < 0 ? "?" : "&") + "after=" + encodeURIComponent(after));
  src.addEventListener("alert", function (ev) {
    var msg = JSON.parse(ev.data);
    if (body.querySelector('tr[data-key="' + CSS.escape(msg.key) + '"]')) { return; }
    var tmp = document.createElement("tbody");
    tmp.innerHTML = msg.html;  // rendered and escaped by the console
    var row = tmp.firstElementChild;
    row.classList.add("fresh");
    body.insertBefore(row, body.firstChild);
    var empty = document.querySelector("p.empty"); if (empty) { empty.remove(); }
    window.ceBeeps += muted ? 0 : 1;
    beep();
  });
})();
