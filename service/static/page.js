// The try-the-model page: an image (a file or a drawing) is sent as it is to
// POST /predict/image, where the server makes the model's input from it (service/codecs/images.py: the
// one preparation, the API's and this page's), and the answer is drawn as SVG. Plain
// JavaScript, no dependencies; every URL is relative, so the page also works behind a path
// prefix. What the model expects (shape, image mode, class names) is read from GET /v1/model.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STROKE_FRACTION = 22 / 280; // pen width relative to the drawing pad
  // Below this share of the most uncertain (ln C nats), the total uncertainty is too small for
  // its split into aleatoric and epistemic parts to mean anything: the split is not shown.
  const SPLIT_MIN_SHARE = 0.02;

  const state = {
    model: null, // the answer of GET /v1/model
    classes: [],
    images: { upload: null, draw: null }, // {blob, name, url (a data: URL of the file sent)}
    shown: null, // [answer, request] on the page, drawn again when the width changes
  };

  // ---------- input ----------

  function mode() {
    return document.querySelector('input[name="source"]:checked').value;
  }

  function current() {
    return state.images[mode()];
  }

  function updatePreview() {
    const img = current();
    const caption = $("preview-caption");
    const preview = $("preview");
    if (!img) {
      preview.hidden = true;
      preview.removeAttribute("src");
      caption.textContent = "What is sent: nothing yet.";
      updateSubmit();
      return;
    }
    preview.src = img.url; // the very bytes sent, as a data: URL
    preview.hidden = false;
    const input = (state.model && state.model.input) || {};
    const shape = Array.isArray(input.shape) ? input.shape.join("\u00d7") : "?";
    caption.textContent =
      `What is sent, from ${img.name}: the image file as it is (${img.blob.type || "image"}, ` +
      `${img.blob.size} bytes). The server makes the model's input (${shape}, ` +
      `${input.image_mode === "RGB" ? "RGB" : "grayscale"}) from it, as for any upload to ` +
      "POST /predict/image.";
    updateSubmit();
  }

  function updateSubmit() {
    $("submit").disabled = !(state.model && current());
  }

  function setMode() {
    const draw = mode() === "draw";
    $("draw-box").hidden = !draw;
    $("upload-box").hidden = draw;
    updatePreview();
  }

  function dataUrl(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  /** Whether the browser can show ``url`` as an image (the server decides what it can read). */
  function loads(url) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(true);
      img.onerror = () => resolve(false);
      img.src = url;
    });
  }

  async function loadFile() {
    const file = $("file").files[0];
    if (!file) return;
    hideError();
    const url = await dataUrl(file);
    if (!(await loads(url))) {
      state.images.upload = null;
      updatePreview();
      showError(`${file.name} could not be read as an image (PNG or JPEG expected).`);
      return;
    }
    state.images.upload = { blob: file, name: file.name, url };
    updatePreview();
  }

  function setUpPad() {
    const pad = $("pad");
    const ctx = pad.getContext("2d");
    const clear = () => {
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, pad.width, pad.height);
    };
    clear();
    let last = null;
    const at = (e) => {
      const r = pad.getBoundingClientRect();
      return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
    };
    const stroke = (a, b) => {
      ctx.strokeStyle = "#fff";
      ctx.fillStyle = "#fff";
      ctx.lineWidth = STROKE_FRACTION * pad.width;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0], b[1]);
      ctx.stroke();
    };
    pad.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      try {
        pad.setPointerCapture(e.pointerId);
      } catch {
        // a synthetic pointer cannot always be captured; drawing works without it
      }
      last = at(e);
      stroke(last, last);
    });
    pad.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = at(e);
      stroke(last, p);
      last = p;
    });
    const end = () => {
      if (!last) return;
      last = null;
      pad.toBlob(async (blob) => {
        if (!blob) return;
        state.images.draw = { blob, name: "drawing.png", url: await dataUrl(blob) };
        updatePreview();
      }, "image/png");
    };
    pad.addEventListener("pointerup", end);
    pad.addEventListener("pointercancel", end);
    $("clear").addEventListener("click", () => {
      clear();
      state.images.draw = null;
      updatePreview();
    });
  }

  // ---------- talking to the API ----------

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  /** The message of an error answer: {message, detail: [...]} (docs/api.md), or V2's {error}. */
  function errorText(body) {
    if (!body || typeof body !== "object") return "";
    if (typeof body.message === "string") return body.message;
    if (typeof body.error === "string") return body.error;
    return JSON.stringify(body);
  }

  function integerField(id, name) {
    const el = $(id);
    if (el.validity.badInput) throw new Error(`${name} must be a whole number.`);
    const text = el.value.trim();
    return text === "" ? undefined : Number(text);
  }

  async function submit(event) {
    event.preventDefault();
    const img = current();
    if (!img) return;
    hideError();
    const form = new FormData();
    const shown = { files: [img.name] };
    try {
      form.append("files", img.blob, img.name);
      const k = integerField("k", "K");
      const seed = integerField("seed", "The seed");
      if (k !== undefined) {
        form.append("num_samples", String(k));
        shown.num_samples = k;
      }
      if (seed !== undefined) {
        form.append("seed", String(seed));
        shown.seed = seed;
      }
    } catch (err) {
      showError(err.message);
      return;
    }
    const result = $("result");
    result.setAttribute("aria-busy", "true");
    result.dataset.state = "pending";
    $("submit").disabled = true;
    try {
      const res = await fetch("predict/image", {
        method: "POST",
        headers: { Accept: "application/json" },
        body: form, // multipart/form-data, its boundary set by the browser
      });
      let answer = null;
      try {
        answer = await res.json();
      } catch {
        answer = null;
      }
      if (!res.ok) {
        showNoResult();
        showError(`The API answered ${res.status}: ${errorText(answer) || res.statusText}`);
        result.dataset.state = "error";
        return;
      }
      render(answer, shown);
      result.dataset.state = "done";
    } catch (err) {
      showNoResult();
      showError(`The request failed: ${err.message}`);
      result.dataset.state = "error";
    } finally {
      result.removeAttribute("aria-busy");
      updateSubmit();
    }
  }

  function showNoResult() {
    state.shown = null;
    $("result-body").hidden = true;
    $("result-empty").hidden = false;
    $("result-empty").textContent = "No answer for this request: see the error.";
    $("status").textContent = "";
  }

  // ---------- drawing the answer ----------

  function fmt(x) {
    if (x === 0) return "0";
    return Math.abs(x) >= 0.001 ? x.toFixed(4) : x.toExponential(2);
  }

  function percent(x) {
    return `${(100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 0)}%`;
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  /** The width of a chart in CSS pixels: one SVG unit per pixel keeps text readable. */
  function chartWidth(container) {
    return Math.max(240, Math.round(container.clientWidth)) || 400;
  }

  function chartBox(container, width, height, label) {
    const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
    container.replaceChildren(box);
    return box;
  }

  function shorten(name, chars) {
    return name.length <= chars ? name : `${name.slice(0, Math.max(1, chars - 1))}\u2026`;
  }

  function barChart(probs, names, top) {
    const W = chartWidth($("chart"));
    const H = 190;
    const [padTop, padBottom, side] = [18, 22, 4];
    const slot = (W - 2 * side) / probs.length;
    const plot = H - padTop - padBottom;
    const best = [...probs.keys()].sort((a, b) => probs[b] - probs[a]).slice(0, 3);
    const label =
      "Predictive distribution; highest: " +
      best.map((i) => `${names[i]} ${probs[i].toFixed(3)}`).join(", ");
    const box = chartBox($("chart"), W, H, label);
    box.appendChild(svg("line", { class: "axis", x1: 0, x2: W, y1: H - padBottom, y2: H - padBottom }));
    const chars = Math.max(1, Math.floor(slot / 6.5));
    probs.forEach((p, i) => {
      const h = Math.max(0, p) * plot;
      const x = side + i * slot;
      const bar = svg("rect", {
        class: i === top ? "bar top" : "bar",
        x: x + slot * 0.15,
        y: H - padBottom - h,
        width: slot * 0.7,
        height: h,
        "data-class": names[i],
        "data-probability": p,
      });
      bar.appendChild(svg("title", {}, `${names[i]}: ${p.toFixed(4)}`));
      box.appendChild(bar);
      const mid = x + slot / 2;
      if (slot >= 28 && p >= 0.0005) {
        const y = H - padBottom - h - 4;
        const attrs = { x: mid, y, "text-anchor": "middle", class: "small" };
        box.appendChild(svg("text", attrs, p.toFixed(3)));
      }
      box.appendChild(svg("text", { x: mid, y: H - 6, "text-anchor": "middle" }, shorten(names[i], chars)));
    });
  }

  function probTable(probs, names) {
    const rows = probs.map((p, i) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = names[i];
      const td = document.createElement("td");
      td.textContent = p.toFixed(3);
      tr.append(th, td);
      return tr;
    });
    $("prob-table").tBodies[0].replaceChildren(...rows);
  }

  /** Two bars: the total on its scale (0 to the entropy of the uniform distribution), split
   * into its aleatoric and epistemic parts; and the same split as shares of the total. Where
   * the total is under SPLIT_MIN_SHARE of its scale there is no uncertainty to split (shares
   * of almost nothing mean nothing): the total alone is drawn, and no shares. */
  function uncertaintyBar(u, classes) {
    const W = chartWidth($("uncertainty"));
    const H = 92;
    const [x0, x1, h] = [4, W - 4, 18];
    const [y1, y2] = [16, 62];
    const span = x1 - x0;
    const max = Math.log(classes); // the entropy of the uniform distribution
    const total = u.predictive_entropy;
    const ale = Math.max(0, u.expected_entropy);
    const epi = Math.max(0, u.mutual_information);
    const split = total >= SPLIT_MIN_SHARE * max && ale + epi > 0;
    const share = split ? ale / (ale + epi) : null;
    $("uncertainty").dataset.split = String(split);
    const label = split
      ? `Total uncertainty ${fmt(total)} nats of at most ${max.toFixed(3)}: aleatoric ` +
        `${fmt(u.expected_entropy)} plus epistemic ${fmt(u.mutual_information)} ` +
        `(${percent(share)} and ${percent(1 - share)})`
      : `Total uncertainty ${fmt(total)} nats of at most ${max.toFixed(3)}: too little to split`;
    const box = chartBox($("uncertainty"), W, H, label);
    const scale = (v) => (Math.max(0, Math.min(v, max)) / max) * span;
    box.appendChild(svg("text", { x: x0, y: y1 - 4, class: "small" }, "Total, from 0 to the most uncertain"));
    const maxLabel = `ln ${classes} = ${max.toFixed(3)}`;
    box.appendChild(svg("text", { x: x1, y: y1 - 4, "text-anchor": "end", class: "small" }, maxLabel));
    box.appendChild(svg("rect", { class: "track", x: x0, y: y1, width: span, height: h }));
    if (split) {
      const wa = scale(ale);
      box.appendChild(svg("rect", { class: "aleatoric", x: x0, y: y1, width: wa, height: h }));
      const we = Math.min(scale(epi), span - wa);
      box.appendChild(svg("rect", { class: "epistemic", x: x0 + wa, y: y1, width: we, height: h }));
    } else {
      box.appendChild(svg("rect", { class: "total", x: x0, y: y1, width: scale(total), height: h }));
    }
    const end = x0 + scale(total);
    box.appendChild(svg("line", { class: "threshold", x1: end, x2: end, y1: y1 - 2, y2: y1 + h + 2 }));
    if (!split) {
      const note = `Too little uncertainty to split: under ${percent(SPLIT_MIN_SHARE)} of ln ${classes}`;
      box.appendChild(svg("text", { x: x0, y: y2 + 13, class: "small" }, note));
    } else {
      box.appendChild(svg("text", { x: x0, y: y2 - 4, class: "small" }, "Split of the total"));
      box.appendChild(svg("rect", { class: "track", x: x0, y: y2, width: span, height: h }));
      const cut = share * span;
      box.appendChild(svg("rect", { class: "aleatoric", x: x0, y: y2, width: cut, height: h }));
      const rest = { class: "epistemic", x: x0 + cut, y: y2, width: span - cut, height: h };
      box.appendChild(svg("rect", rest));
      const labels = [
        [share, x0 + 4, "start", `aleatoric ${percent(share)}`],
        [1 - share, x1 - 4, "end", `epistemic ${percent(1 - share)}`],
      ];
      for (const [part, x, anchor, text] of labels) {
        if (part * span > 90) {
          const attrs = { x, y: y2 + 13, "text-anchor": anchor, class: "inside" };
          box.appendChild(svg("text", attrs, text));
        }
      }
    }
    const rows = [
      ["Total (predictive entropy)", u.predictive_entropy, null],
      ["Aleatoric (expected entropy)", ale, "aleatoric"],
      ["Epistemic (mutual information)", epi, "epistemic"],
    ];
    const items = [];
    for (const [name, value, swatch] of rows) {
      const dt = document.createElement("dt");
      if (swatch && split) {
        const s = document.createElement("span");
        s.className = `swatch ${swatch}`;
        s.setAttribute("aria-hidden", "true");
        dt.appendChild(s);
      }
      dt.appendChild(document.createTextNode(name));
      const dd = document.createElement("dd");
      dd.textContent = fmt(value);
      if (swatch && share !== null) {
        dd.textContent += ` (${percent(swatch === "aleatoric" ? share : 1 - share)})`;
      }
      items.push(dt, dd);
    }
    $("uncertainty-values").replaceChildren(...items);
  }

  function gauge(anomaly) {
    const W = chartWidth($("gauge"));
    const H = 64;
    const [x0, x1, y, h] = [4, W - 4, 20, 16];
    const { score, threshold } = anomaly;
    const max = Math.max(2 * threshold, 1.15 * score, 1e-9);
    const at = (v) => x0 + (Math.max(0, Math.min(v, max)) / max) * (x1 - x0);
    const label = `${anomaly.score_name} ${fmt(score)} against the threshold ${fmt(threshold)}: ${
      anomaly.is_anomaly ? "above, flagged" : "not above, not flagged"
    }`;
    const box = chartBox($("gauge"), W, H, label);
    box.appendChild(svg("rect", { class: "track", x: x0, y, width: x1 - x0, height: h }));
    const t = at(threshold);
    box.appendChild(svg("rect", { class: "over", x: t, y, width: x1 - t, height: h }));
    box.appendChild(svg("line", { class: "threshold", x1: t, x2: t, y1: y - 6, y2: y + h + 2 }));
    const tAttrs = { x: t, y: y - 8, "text-anchor": t > W / 2 ? "end" : "start", class: "small" };
    box.appendChild(svg("text", tAttrs, `threshold ${fmt(threshold)}`));
    const s = at(score);
    box.appendChild(svg("path", { class: "marker", d: `M${s} ${y + h} l-6 10 h12 z` }));
    box.appendChild(svg("rect", { class: "marker", x: s - 1.5, y, width: 3, height: h }));
    const anchor = s < 60 ? "start" : s > W - 60 ? "end" : "middle";
    box.appendChild(svg("text", { x: s, y: H - 2, "text-anchor": anchor }, `score ${fmt(score)}`));
    const info = state.model.anomaly || {};
    const fpr = typeof info.target_fpr === "number" ? `${+(100 * info.target_fpr).toFixed(2)}%` : "a target";
    const on = info.calibration_set ? ` on ${info.calibration_set}` : "";
    const what =
      anomaly.score_name === "combined"
        ? " (the larger of the mutual information and the distance from the training data, " +
          "each divided by its own threshold)"
        : "";
    $("gauge-text").textContent =
      `${anomaly.score_name} = ${fmt(score)}${what}; flagged above ${fmt(threshold)}, ` +
      `the threshold calibrated for a ${fpr} false-positive rate${on}.`;
  }

  function facts(answer, prediction) {
    const model = answer.model || {};
    const rows = [
      ["Networks averaged (K)", String(answer.num_samples)],
      ["Model variance", fmt(prediction.uncertainty.model_variance)],
      ...(prediction.uncertainty.data_support == null
        ? []
        : [["Distance from the training data", fmt(prediction.uncertainty.data_support)]]),
      ["Seed", answer.seed == null ? "none (networks drawn from the pool)" : String(answer.seed)],
      ["Model", `${model.id} ${model.version} (sha256 ${String(model.checkpoint_sha256).slice(0, 12)})`],
    ];
    const items = [];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      if (name.startsWith("Networks")) dd.id = "num-samples";
      if (name === "Model variance") dd.id = "model-variance";
      if (name.startsWith("Distance")) dd.id = "data-support";
      items.push(dt, dd);
    }
    $("facts").replaceChildren(...items);
  }

  function render(answer, body) {
    state.shown = [answer, body];
    $("result-empty").hidden = true;
    $("result-body").hidden = false; // before drawing: the charts take its width
    const prediction = answer.predictions[0];
    const probs = prediction.probabilities;
    const names = probs.map((_, i) => (state.classes.length === probs.length ? state.classes[i] : String(i)));
    const top = prediction.label;
    $("label").textContent = names[top];
    $("label-p").textContent = `with probability ${probs[top].toFixed(3)}`;
    const flag = $("flag");
    const bad = prediction.anomaly.is_anomaly;
    flag.className = `flag ${bad ? "anomalous" : "normal"}`;
    flag.dataset.anomaly = String(bad);
    flag.textContent = bad
      ? "Anomaly: flagged, the score is above its calibrated threshold (unlike the training data)."
      : "Not an anomaly: the score is within its calibrated threshold.";
    $("status").textContent =
      `Predicted ${names[top]} with probability ${probs[top].toFixed(3)}; ` +
      `${bad ? "flagged as an anomaly" : "not an anomaly"}; ${answer.num_samples} networks.`;
    barChart(probs, names, top);
    probTable(probs, names);
    uncertaintyBar(prediction.uncertainty, probs.length);
    gauge(prediction.anomaly);
    facts(answer, prediction);
    $("request-json").textContent = JSON.stringify(body);
  }

  // ---------- start ----------

  /** Class names from the model's metadata where it has them, else the class indices. */
  function classNames(info) {
    if (Array.isArray(info.class_names) && info.class_names.length > 0) return info.class_names.map(String);
    const n = Number.isInteger(info.num_classes) ? info.num_classes : 0;
    return Array.from({ length: n }, (_, i) => String(i));
  }

  function init(info) {
    state.model = info;
    const input = info.input || {};
    state.classes = classNames(info);
    const k = $("k");
    k.value = info.default_num_samples;
    if (info.limits && info.limits.max_num_samples) k.max = info.limits.max_num_samples;
    const shape = Array.isArray(input.shape) ? input.shape.join("\u00d7") : "?";
    $("model-line").textContent =
      `Model ${info.id} ${info.version}. Input: ${input.description || shape}. ` +
      `${state.classes.length} classes; ${info.default_num_samples} posterior networks by default.`;
    if (!input.image_mode) {
      const notice = $("unsupported");
      notice.textContent =
        `This model's input (shape ${JSON.stringify(input.shape)}) is not an image, so this ` +
        "page cannot make one; send it to POST /predict as a list of values.";
      notice.hidden = false;
      $("input-controls").hidden = true;
      return;
    }
    updatePreview();
    document.body.dataset.ready = "true";
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function loadModel() {
    for (;;) {
      try {
        const res = await fetch("v1/model", { headers: { Accept: "application/json" } });
        if (res.ok) {
          init(await res.json());
          return;
        }
        let body = null;
        try {
          body = await res.json();
        } catch {
          body = null;
        }
        if (res.status !== 503) {
          $("model-line").textContent = "The model's description could not be loaded.";
          showError(`GET /v1/model answered ${res.status}: ${errorText(body) || res.statusText}`);
          return;
        }
        $("model-line").textContent = "The service is starting; retrying\u2026";
      } catch {
        $("model-line").textContent = "The service cannot be reached; retrying\u2026";
      }
      await sleep(2000);
    }
  }

  for (const radio of document.querySelectorAll('input[name="source"]')) {
    radio.addEventListener("change", setMode);
  }
  $("file").addEventListener("change", loadFile);
  $("predict-form").addEventListener("submit", submit);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => state.shown && !$("result-body").hidden && render(...state.shown), 150);
  });
  setUpPad();
  setMode();
  loadModel();
})();
