// A Node.js client of the teacher server, written from protos/ and their comments alone.
//
// node client.mjs ADDRESS TOKEN REQUEST_JSON
//   REQUEST_JSON: {"tokens": [[...], ...], "k": 4, "layers": [0], "request_id": "18446744073709551615"}
// Prints one JSON object: health, a few GetInfo fields, and the decoded Forward and Stream answers.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const [address, token, requestPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(requestPath, "utf8"));

// longs: String keeps uint64 request ids (and int64 shapes) exact, as the proto says.
const definition = protoLoader.loadSync(
  ["distill/teacher/v1/teacher.proto", "grpc/health/v1/health.proto"],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true });
const loaded = grpc.loadPackageDefinition(definition);
const Teacher = loaded.distill.teacher.v1.Teacher;
const Health = loaded.grpc.health.v1.Health;

const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${token}`);

function call(client, method, request, options = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 60_000, ...options },
      (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// ---- tensors: raw little-endian bytes in C order ------------------------------------------------

function int32Tensor(rows) {
  const b = rows.length, t = rows[0].length;
  const data = Buffer.alloc(b * t * 4);
  rows.flat().forEach((v, i) => data.writeInt32LE(v, i * 4));
  return { dtype: "DTYPE_INT32", shape: [String(b), String(t)], data };
}

function count(tensor) {
  return tensor.shape.reduce((n, d) => n * Number(d), 1);
}

function halfToFloat(h) { // IEEE 754 binary16
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function decode(tensor) {
  const n = count(tensor), data = tensor.data, view = new DataView(data.buffer, data.byteOffset, data.length);
  const out = new Array(n);
  if (tensor.packed_bits > 0) { // one bit stream, LSB first, padded once at the end
    const bits = tensor.packed_bits;
    if (data.length !== Math.ceil(n * bits / 8)) throw new Error("packed length");
    for (let i = 0; i < n; i++) {
      let v = 0;
      for (let j = 0; j < bits; j++) {
        const bit = i * bits + j;
        v |= ((data[bit >> 3] >> (bit & 7)) & 1) << j;
      }
      out[i] = v;
    }
    return out;
  }
  const size = { DTYPE_INT32: 4, DTYPE_FLOAT32: 4, DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2 }[tensor.dtype];
  if (data.length !== n * size) throw new Error(`${tensor.dtype}: ${data.length} bytes for ${n} elements`);
  for (let i = 0; i < n; i++) {
    if (tensor.dtype === "DTYPE_INT32") out[i] = view.getInt32(i * 4, true);
    else if (tensor.dtype === "DTYPE_FLOAT32") out[i] = view.getFloat32(i * 4, true);
    else if (tensor.dtype === "DTYPE_FLOAT16") out[i] = halfToFloat(view.getUint16(i * 2, true));
    else { // BFLOAT16: the upper 16 bits of a float32
      const f = new DataView(new ArrayBuffer(4));
      f.setUint32(0, view.getUint16(i * 2, true) << 16, false);
      out[i] = f.getFloat32(0, false);
    }
  }
  return out;
}

function answer(reply) {
  if (reply.error) return { request_id: reply.request_id, error: reply.error };
  return {
    request_id: reply.request_id,
    shape: reply.topk_ids.shape.map(Number),
    ids: decode(reply.topk_ids),
    logits: decode(reply.topk_logits),
    logits_dtype: reply.topk_logits.dtype,
    lse: decode(reply.logsumexp),
    temperatures: reply.temperatures,
    state_layers: reply.state_layers,
    states: Object.fromEntries(Object.entries(reply.layer_states).map(([k, v]) => [k, decode(v)])),
  };
}

// ---- calls ----------------------------------------------------------------------------------------

const health = new Health(address, grpc.credentials.createInsecure());
const status = await call(health, "Check", { service: "" });
const probe = new Teacher(address, grpc.credentials.createInsecure());
const info = await call(probe, "GetInfo", {});
probe.close();
// Answers may be up to limits.max_message_bytes, far above grpc-js's 4 MiB receive default.
const teacher = new Teacher(address, grpc.credentials.createInsecure(),
  { "grpc.max_receive_message_length": Number(info.limits.max_message_bytes) });

const request = {
  request_id: spec.request_id, tokens: int32Tensor(spec.tokens),
  spec: { k: spec.k, temperatures: [1.0, 2.0], value_dtype: "DTYPE_BFLOAT16", pack_ids: true,
          layers: spec.layers, states: ["attn_out"], state_dtype: "DTYPE_BFLOAT16" },
};
const forward = answer(await call(teacher, "Forward", request));

const streamed = await new Promise((resolve, reject) => {
  const replies = [];
  const stream = teacher.Stream(metadata, { deadline: Date.now() + 60_000 });
  stream.on("data", (reply) => replies.push(answer(reply)));
  stream.on("error", reject);
  stream.on("end", () => resolve(replies));
  stream.write({ ...request, request_id: "7" });
  stream.write({ ...request, request_id: "8", spec: { ...request.spec, k: 0 } }); // a per-request error
  stream.write({ ...request, request_id: "9", spec: { ...request.spec, value_dtype: "DTYPE_FLOAT16" } });
  stream.end();
});
teacher.close();
health.close();

console.log(JSON.stringify({
  health: status.status, vocab_size: info.vocab_size, packed_id_bits: info.packed_id_bits, forward, streamed,
}));
