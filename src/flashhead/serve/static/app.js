// flashhead live page: upload a portrait, stream microphone or file audio, watch the avatar.
// WebRTC (preferred): the audio goes up as a track, the avatar comes back as video + audio tracks of one stream.
// WebSocket (fallback): PCM16 goes up, JPEG frames + PCM16 come back and are played against the audio clock.
// Nothing here needs a build step. `window.flashhead.stats` exposes the measurements (tests read them).
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000;

const stats = {
  state: "idle", transport: null, sessionId: null,
  audioStartedAt: null, firstFrameAt: null, firstFrameMs: null,
  chunkLatencies: [], clientLatencies: [], framesShown: 0, fps: 0, errors: [], done: null,
};
window.flashhead = { stats };

// ---- token: from the URL fragment (#token=...), else asked for when the server says 401 -------------------
let token = new URLSearchParams(location.hash.slice(1)).get("token") || sessionStorage.getItem("flashhead-token");

async function api(path, options = {}, retry = true) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && retry) {
    const entered = window.prompt("This server needs an access token:");
    if (entered) {
      token = entered.trim();
      sessionStorage.setItem("flashhead-token", token);
      return api(path, options, false);
    }
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---- UI helpers -----------------------------------------------------------------------------------------
function log(text, isError = false) {
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (isError) { line.className = "error"; stats.errors.push(text); }
  $("log").prepend(line);
}
function setState(state) { stats.state = state; $("s-state").textContent = state; }
const ms = (x) => (x == null ? "–" : `${Math.round(x)} ms`);
function showStats() {
  $("s-first").textContent = ms(stats.firstFrameMs);
  const c = stats.chunkLatencies;
  $("s-chunk").textContent = c.length ? `${ms(c[c.length - 1])} / ${ms(c.reduce((a, b) => a + b, 0) / c.length)}` : "–";
  const k = stats.clientLatencies;
  $("s-client").textContent = k.length ? ms(k[k.length - 1]) : "–";
  $("s-fps").textContent = `${stats.framesShown} / ${stats.fps.toFixed(1)}`;
}
setInterval(showStats, 250);

const frameTimes = [];
function frameShown() {
  const now = performance.now();
  if (stats.firstFrameAt === null) {
    stats.firstFrameAt = now;
    stats.firstFrameMs = now - (stats.audioStartedAt ?? now);
    log(`first frame after ${Math.round(stats.firstFrameMs)} ms`);
  }
  stats.framesShown += 1;
  frameTimes.push(now);
  while (frameTimes.length && frameTimes[0] < now - 1000) frameTimes.shift();
  stats.fps = frameTimes.length;
}

// ---- portrait --------------------------------------------------------------------------------------------
let portraitId = null;
$("portrait-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  $("portrait-status").textContent = "detecting face…";
  const form = new FormData();
  form.append("file", file);
  form.append("crop", $("crop").checked ? "true" : "false");
  try {
    const portrait = await (await api("/v1/portraits", { method: "POST", body: form })).json();
    portraitId = portrait.id;
    const image = await (await api(portrait.image_url)).blob();
    $("portrait-preview").src = URL.createObjectURL(image);
    $("portrait-status").textContent = `ready (${portrait.width}×${portrait.height})`;
    $("start").disabled = false;
    window.flashhead.portraitId = portraitId;
  } catch (e) {
    portraitId = null;
    $("portrait-status").textContent = "";
    log(`portrait: ${e.message}`, true);
  }
});

// ---- audio sources ---------------------------------------------------------------------------------------
const choice = (name) => document.querySelector(`input[name=${name}]:checked`).value;

async function microphone() {
  return navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
}

// A file played in real time into a MediaStream (WebRTC path); `onended` fires when it has played.
async function fileStream(file, onended) {
  const context = new AudioContext();
  const element = new Audio(URL.createObjectURL(file));
  const destination = context.createMediaStreamDestination();
  context.createMediaElementSource(element).connect(destination);
  element.addEventListener("ended", onended);
  await element.play();
  return { stream: destination.stream, stop: () => { element.pause(); context.close(); } };
}

// ---- WebRTC ----------------------------------------------------------------------------------------------
let current = null;  // { stop(), interrupt() }

async function startWebRTC() {
  const video = $("avatar");
  video.classList.remove("hidden");
  $("view").classList.add("hidden");
  const pc = new RTCPeerConnection();
  const control = pc.createDataChannel("control");
  let source;
  if (choice("source") === "mic") {
    const stream = await microphone();
    source = { stream, stop: () => stream.getTracks().forEach((t) => t.stop()) };
  } else {
    const file = $("audio-file").files[0];
    if (!file) throw new Error("choose an audio file first");
    source = await fileStream(file, () => control.readyState === "open" && control.send(JSON.stringify({ type: "end" })));
  }
  source.stream.getAudioTracks().forEach((track) => pc.addTrack(track, source.stream));
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (event) => {
    if (video.srcObject !== event.streams[0]) video.srcObject = event.streams[0];
  };
  control.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "chunk") {
      if (message.latency_ms != null) stats.chunkLatencies.push(message.latency_ms);
    } else if (message.type === "done") {
      stats.done = message;
      log(`done: ${message.frames} frames (${message.reason})`);
      finish();
    } else if (message.type === "error") {
      log(`${message.code}: ${message.message}`, true);
      if (message.fatal) finish();
    }
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected" && stats.audioStartedAt === null) {
      stats.audioStartedAt = performance.now();  // audio packets start flowing now
      setState("streaming");
    } else if (pc.connectionState === "failed") {
      log("WebRTC connection failed", true);
      finish();
    }
  };
  const mirror = $("view").getContext("2d", { willReadFrequently: true });
  const onFrame = () => {
    if (video.videoWidth) {
      $("view").width = video.videoWidth;
      $("view").height = video.videoHeight;
      mirror.drawImage(video, 0, 0);  // a readable copy of the frame on screen
      frameShown();
    }
    if (current && current.pc === pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);

  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {  // non-trickle: send the offer with every candidate in it
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, 3000);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
  const answer = await (await api("/v1/webrtc/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", portrait_id: portraitId }),
  })).json();
  stats.sessionId = answer.session_id;
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  log(`WebRTC session ${answer.session_id}`);
  return {
    pc,
    stop() {
      if (control.readyState === "open") control.send(JSON.stringify({ type: "end" }));
      source.stop();
    },
    interrupt() { if (control.readyState === "open") control.send(JSON.stringify({ type: "interrupt" })); },
    close() { source.stop(); pc.close(); },
  };
}

// ---- WebSocket -------------------------------------------------------------------------------------------
async function startWebSocket() {
  const file = $("audio-file").files[0];
  if (choice("source") === "file" && !file) throw new Error("choose an audio file first");
  $("avatar").classList.add("hidden");
  const canvas = $("view");
  canvas.classList.remove("hidden");
  const draw = canvas.getContext("2d", { willReadFrequently: true });
  const context = new AudioContext({ sampleRate: SAMPLE_RATE });  // the browser resamples inputs to 16 kHz
  const frames = new Map();  // frame index -> ImageBitmap
  const sent = [];  // [samples sent so far, time] (client latency of a chunk: its last sample's send time)
  let samplesSent = 0, origin = null, header = null, sender = null, fps = 25, lastDrawn = -1;

  const url = new URL("/v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";

  function sendPcm(float32) {
    const pcm = new Int16Array(float32.length);
    for (let i = 0; i < float32.length; i++) pcm[i] = Math.max(-1, Math.min(1, float32[i])) * 32767;
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(pcm.buffer);
    if (stats.audioStartedAt === null) stats.audioStartedAt = performance.now();
    samplesSent += pcm.length;
    sent.push([samplesSent, performance.now()]);
  }

  async function startAudio() {
    if (choice("source") === "file") {
      const buffer = await context.decodeAudioData(await file.arrayBuffer());
      const samples = buffer.getChannelData(0);
      let position = 0;
      const piece = SAMPLE_RATE / 10;  // 100 ms, sent in real time
      sender = setInterval(() => {
        if (position >= samples.length) {
          clearInterval(sender);
          ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify({ type: "end" }));
          return;
        }
        sendPcm(samples.subarray(position, position + piece));
        position += piece;
      }, 100);
    } else {
      const stream = await microphone();
      const input = context.createMediaStreamSource(stream);
      const tap = context.createScriptProcessor(2048, 1, 1);
      tap.onaudioprocess = (event) => sendPcm(event.inputBuffer.getChannelData(0));
      input.connect(tap);
      tap.connect(context.destination);  // the processor only runs when connected; it outputs silence
      sender = { stop: () => { stream.getTracks().forEach((t) => t.stop()); tap.disconnect(); } };
    }
  }

  function render() {  // draw the frame that the audio clock says is due
    if (origin !== null) {
      const index = Math.floor((context.currentTime - origin) * fps);
      if (index !== lastDrawn && frames.has(index)) {
        const bitmap = frames.get(index);
        canvas.width = bitmap.width;
        canvas.height = bitmap.height;
        draw.drawImage(bitmap, 0, 0);
        frames.delete(index);
        for (const k of frames.keys()) if (k < index) { frames.get(k).close(); frames.delete(k); }
        lastDrawn = index;
        frameShown();
      }
    }
    if (ws.readyState <= WebSocket.OPEN || frames.size) requestAnimationFrame(render);
  }

  async function onChunk(h, payload) {
    if (h.latency_ms != null) stats.chunkLatencies.push(h.latency_ms);
    const lastSample = (h.start_frame + h.num_frames) * (SAMPLE_RATE / h.fps);
    const entry = sent.find(([n]) => n >= lastSample);
    if (entry && !(current && current.realtime)) stats.clientLatencies.push(performance.now() - entry[1]);
    fps = h.fps;
    let offset = 0;
    const bitmaps = [];
    for (const size of h.frame_bytes) {
      bitmaps.push(createImageBitmap(new Blob([payload.slice(offset, offset + size)], { type: "image/jpeg" })));
      offset += size;
    }
    const pcm = new Int16Array(payload.slice(offset, offset + h.audio_bytes));
    if (origin === null || context.currentTime > origin + h.pts) origin = context.currentTime + 0.05 - h.pts;
    (await Promise.all(bitmaps)).forEach((b, i) => frames.set(h.start_frame + i, b));
    if (pcm.length) {
      const audio = context.createBuffer(1, pcm.length, SAMPLE_RATE);
      const channel = audio.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
      const node = context.createBufferSource();
      node.buffer = audio;
      node.connect(context.destination);
      node.start(origin + h.pts);
    }
  }

  let pending = Promise.resolve();  // chunks are handled in order
  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", portrait_id: portraitId, realtime: choice("source") === "mic", encoding: "jpeg",
  }));
  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      const h = header;
      header = null;
      pending = pending.then(() => onChunk(h, event.data));
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "ready") {
      stats.sessionId = message.session_id;
      setState("streaming");
      log(`WebSocket session ${message.session_id} (${message.width}×${message.height} @ ${message.fps} fps)`);
      startAudio().catch((e) => log(`audio: ${e.message}`, true));
      requestAnimationFrame(render);
    } else if (message.type === "chunk") {
      header = message;
    } else if (message.type === "done") {
      pending.then(() => { stats.done = message; log(`done: ${message.frames} frames (${message.reason})`); });
    } else if (message.type === "error") {
      log(`${message.code}: ${message.message}`, true);
    }
  };
  ws.onclose = (event) => {
    if (event.code !== 1000) log(`connection closed (${event.code} ${event.reason})`, event.code !== 1001);
    stopSender();
    pending.then(finish);
  };
  function stopSender() {
    if (sender && sender.stop) sender.stop(); else if (sender) clearInterval(sender);
    sender = null;
  }
  return {
    realtime: choice("source") === "mic",
    stop() {
      stopSender();
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
    },
    interrupt() { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "interrupt" })); },
    close() { stopSender(); ws.close(); },
  };
}

// ---- buttons ---------------------------------------------------------------------------------------------
function finish() {
  if (stats.state !== "idle") setState(stats.done ? "done" : "stopped");
  $("start").disabled = !portraitId;
  $("interrupt").disabled = $("stop").disabled = true;
  if (current) { const c = current; current = null; setTimeout(() => c.close(), 500); }
}

$("start").addEventListener("click", async () => {
  Object.assign(stats, { audioStartedAt: null, firstFrameAt: null, firstFrameMs: null, chunkLatencies: [],
    clientLatencies: [], framesShown: 0, fps: 0, done: null, sessionId: null });
  stats.transport = choice("transport");
  $("start").disabled = true;
  setState("connecting");
  try {
    current = await (stats.transport === "webrtc" ? startWebRTC() : startWebSocket());
    $("interrupt").disabled = $("stop").disabled = false;
  } catch (e) {
    log(e.message, true);
    finish();
  }
});
$("interrupt").addEventListener("click", () => current && current.interrupt());
$("stop").addEventListener("click", () => current && current.stop());
