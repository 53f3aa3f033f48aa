// Audio worklets of the console's browser call (no build step, no dependencies).
// pcm-capture: microphone at the context's rate -> 16 kHz s16le frames of 20 ms (what
//              mod_audio_stream sends), each posted with its loudness.
// pcm-player:  16 kHz s16le frames from the server -> the speakers; "clear" empties the
//              queue at once (the server's clearAudio on barge-in).

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.outRate = (options.processorOptions && options.processorOptions.rate) || 16000;
    this.step = sampleRate / this.outRate; // input samples per output sample
    this.frame = new Int16Array(this.outRate / 50);
    this.n = 0;
    this.acc = 0;
    this.count = 0;
    this.pos = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      // Box-car average over each output sample's span: a crude anti-alias low-pass.
      this.acc += input[i];
      this.count += 1;
      this.pos += 1;
      if (this.pos >= this.step) {
        this.pos -= this.step;
        const v = Math.max(-1, Math.min(1, this.acc / this.count));
        this.acc = 0;
        this.count = 0;
        this.frame[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
        this.energy += v * v;
        if (this.n === this.frame.length) {
          const rms = Math.sqrt(this.energy / this.n);
          const out = this.frame.slice(0);
          this.port.postMessage({ pcm: out.buffer, rms: rms }, [out.buffer]);
          this.n = 0;
          this.energy = 0;
        }
      }
    }
    return true;
  }
}

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.inRate = (options.processorOptions && options.processorOptions.rate) || 16000;
    this.step = this.inRate / sampleRate; // input samples per output sample
    this.queue = [];
    this.head = null;
    this.headPos = 0;
    this.prev = 0;
    this.last = 0;
    this.phase = 0;
    this.level = 0;
    this.port.onmessage = (e) => {
      if (e.data === "clear") {
        this.queue = [];
        this.head = null;
        return;
      }
      const pcm = new Int16Array(e.data);
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 0x8000;
      this.queue.push(f);
    };
  }

  next() {
    if (!this.head || this.headPos >= this.head.length) {
      this.head = this.queue.shift() || null;
      this.headPos = 0;
      if (!this.head) return null;
    }
    return this.head[this.headPos++];
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let energy = 0;
    for (let i = 0; i < out.length; i++) {
      // Linear interpolation from 16 kHz up to the context's rate.
      while (this.phase >= 1) {
        const s = this.next();
        if (s === null) {
          this.prev = 0; // starved: silence, not the last sample held
          this.last = 0;
          this.phase = 0;
          break;
        }
        this.prev = this.last;
        this.last = s;
        this.phase -= 1;
      }
      const v = this.prev + (this.last - this.prev) * this.phase;
      out[i] = v;
      energy += v * v;
      this.phase += this.step;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.level = 0.8 * this.level + 0.2 * Math.sqrt(energy / out.length);
    if (currentFrame % (sampleRate / 10) < out.length) this.port.postMessage({ level: this.level });
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
registerProcessor("pcm-player", PcmPlayer);
