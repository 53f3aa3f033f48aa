// The console's "call" button: the microphone to the agent's real pipeline over a WebSocket
// (16 kHz s16le, 20 ms binary frames, as mod_audio_stream sends them), the reply played as it
// arrives, clearAudio = barge-in (the playback queue is flushed), and the call's transcript
// and turn latency shown as the server reports them on the same socket.
(function () {
  "use strict";
  const root = document.getElementById("talk");
  if (!root) return;
  const rate = parseInt(root.dataset.rate, 10);
  const $ = (id) => document.getElementById(id);
  const state = $("state");
  const transcript = $("transcript");
  const latencyBody = document.querySelector("#latency tbody");
  const MIC_VOICED = 0.02; // RMS of a voiced 20 ms frame (float scale)
  const BOT_VOICED = 300; // RMS of a voiced bot frame (s16 scale)
  const CALLER_GAP_MS = 120; // the caller is done: no voiced mic frame for this long
  const BOT_GAP_MS = 250; // a new bot utterance: no voiced bot frame for this long

  let ws = null;
  let ctx = null;
  let stream = null;
  let player = null;
  let lastVoicedAt = null; // the caller's last voiced frame sent (page clock, ms)
  let botAudible = false; // this caller utterance's reply has been measured
  let lastBotVoicedAt = null;
  let userLine = null;
  const turns = []; // {server, page}
  window.pipeswitchCall = {
    turns: turns, events: [], state: "idle", botFrames: 0, botVoiced: 0, playedLevel: 0, clears: 0,
  };
  const call = window.pipeswitchCall;

  function setState(s) {
    state.textContent = s;
    call.state = s;
    root.dataset.state = s;
  }

  function line(cls, html) {
    const li = document.createElement("li");
    li.className = "turn " + cls;
    li.innerHTML = html;
    transcript.appendChild(li);
    li.scrollIntoView({ block: "nearest" });
    return li;
  }

  function esc(s) {
    const d = document.createElement("div");
    d.textContent = s;
    return d.innerHTML;
  }

  function renderLatency() {
    latencyBody.innerHTML = "";
    turns.forEach((t, i) => {
      const tr = document.createElement("tr");
      tr.innerHTML =
        "<td>" + (i + 1) + "</td><td class=server>" +
        (t.server == null ? "-" : t.server + " ms") + "</td><td class=page>" +
        (t.page == null ? "-" : Math.round(t.page) + " ms") + "</td>";
      latencyBody.appendChild(tr);
    });
  }

  function turn(i) {
    while (turns.length <= i) turns.push({ server: null, page: null });
    return turns[i];
  }

  let serverTurns = 0;
  let pageTurns = 0;

  function onText(msg) {
    call.events.push(msg);
    if (msg.type === "clearAudio") {
      call.clears++;
      if (player) player.port.postMessage("clear");
      line("barge", "<i>barge-in: the agent's audio was cut</i>");
    } else if (msg.type === "console.call") {
      root.dataset.call = msg.call_uuid;
    } else if (msg.type === "console.user") {
      if (!userLine) {
        userLine = line("user", "<b>You</b> <span class=text></span>");
      }
      const t = userLine.querySelector(".text");
      t.textContent = (t.textContent + " " + msg.text).trim();
    } else if (msg.type === "console.bot") {
      userLine = null;
      let html = "<b>Agent</b> ";
      if (msg.interrupted) {
        const rest = msg.text.startsWith(msg.heard) ? msg.text.slice(msg.heard.length) : msg.text;
        html += "<span class=heard>" + esc(msg.heard) + "</span><span class=cut>" + esc(rest) +
          "</span><span class=tag>barge-in</span>";
      } else {
        html += esc(msg.text);
      }
      line("assistant", html);
    } else if (msg.type === "console.latency") {
      turn(serverTurns++).server = msg.ms;
      renderLatency();
    }
  }

  function onAudio(buf) {
    if (player) player.port.postMessage(buf, [buf]);
    call.botFrames++;
  }

  function frameRms(buf) {
    const pcm = new Int16Array(buf);
    let e = 0;
    for (let i = 0; i < pcm.length; i++) e += pcm[i] * pcm[i];
    return pcm.length ? Math.sqrt(e / pcm.length) : 0;
  }

  async function start() {
    $("call").disabled = true;
    setState("starting");
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
      });
      ctx = new AudioContext();
      await ctx.audioWorklet.addModule("/console/static/pcm-worklet.js");
      const capture = new AudioWorkletNode(ctx, "pcm-capture", { processorOptions: { rate: rate } });
      player = new AudioWorkletNode(ctx, "pcm-player", { processorOptions: { rate: rate } });
      ctx.createMediaStreamSource(stream).connect(capture);
      player.connect(ctx.destination);
      player.port.onmessage = (e) => {
        $("spk").value = Math.min(1, e.data.level * 4);
        call.playedLevel = Math.max(call.playedLevel, e.data.level); // what reached the speakers
      };
      const agent = $("agent").value;
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
        root.dataset.ws + "?csrf=" + encodeURIComponent(root.dataset.csrf) +
        (agent ? "&agent=" + encodeURIComponent(agent) : "");
      ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => { setState("connected"); $("hangup").disabled = false; };
      ws.onclose = (e) => { setState("ended" + (e.reason ? ": " + e.reason : "")); stop(false); };
      ws.onerror = () => setState("error");
      ws.onmessage = (e) => {
        if (typeof e.data === "string") {
          try { onText(JSON.parse(e.data)); } catch (err) { /* not ours */ }
          return;
        }
        if (frameRms(e.data) > BOT_VOICED) {
          const now = performance.now();
          call.botVoiced++;
          // A reply: the first voiced bot frame of a new utterance (the bot had been quiet)
          // once the caller has stopped (quiet for longer than any frame gap). Bot audio
          // overlapping the caller's speech (the greeting, a barge-in) is not a turn.
          const callerDone = lastVoicedAt !== null && now - lastVoicedAt > CALLER_GAP_MS;
          const newUtterance = lastBotVoicedAt === null || now - lastBotVoicedAt > BOT_GAP_MS;
          if (!botAudible && callerDone && newUtterance) {
            turn(pageTurns++).page = now - lastVoicedAt;
            renderLatency();
            botAudible = true;
          }
          lastBotVoicedAt = now;
        }
        onAudio(e.data);
      };
      capture.port.onmessage = (e) => {
        $("mic").value = Math.min(1, e.data.rms * 4);
        if (e.data.rms > MIC_VOICED) {
          lastVoicedAt = performance.now();
          botAudible = false;
        }
        if (ws && ws.readyState === WebSocket.OPEN) ws.send(e.data.pcm);
      };
    } catch (err) {
      setState("error: " + err.message);
      stop(true);
    }
  }

  function stop(closeSocket) {
    if (closeSocket && ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "hangup");
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ctx) ctx.close();
    stream = null;
    ctx = null;
    player = null;
    $("call").disabled = false;
    $("hangup").disabled = true;
  }

  $("call").addEventListener("click", start);
  $("hangup").addEventListener("click", () => stop(true));
})();
