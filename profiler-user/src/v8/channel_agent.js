// memscope's snapshot channel, installed in a Node.js process by memscope (Runtime.evaluate
// through its inspector, once), see src/v8/channel.rs. It listens on a Unix socket in a fresh
// 0700 directory of the process's temporary directory, accepts ONE connection that proves it
// knows the token (first line), then stops listening and removes the socket and its directory:
// from then on, only that connection can use it. Nothing here keeps the process alive (every
// handle is unref'ed), and the whole thing removes itself if nobody connects in time.
//
// Why: V8 clears its heap object ids (HeapProfiler::ClearObjectIds) whenever an inspector
// session ends or disables its HeapProfiler; a snapshot taken here (v8.getHeapSnapshot, like the
// service's own snapshots) and the in-process session kept open here never end one, so the ids
// of surviving objects stay the same from one snapshot to the next.
//
// Requests (memscope -> here): one JSON object per line, at most 64 KiB.
//   {"id": N, "op": "snapshot"}                     the .heapsnapshot as data frames, then {"id": N, "result": {}}
//   {"id": N, "op": "call", "method": M, "params"}  a HeapProfiler method (allowlist below) through an
//                                                   in-process session that stays connected; its
//                                                   events, then {"id": N, "result"} or {"id": N, "error"}
// Frames (here -> memscope): 1 byte kind ('D' data, 'M' JSON message), 4 bytes length (big
// endian), the payload.
(() => {
  const TOKEN = '__MEMSCOPE_TOKEN__';
  const KEY = Symbol.for('memscope.snapshot-channel');
  const load = (typeof require === 'function') ? require
    : (process.getBuiltinModule ? process.getBuiltinModule.bind(process)
      : process.mainModule.require.bind(process.mainModule));
  const net = load('net'), fs = load('fs'), os = load('os'), path = load('path'), v8 = load('v8');
  const inspector = load('inspector'), crypto = load('crypto');
  const METHODS = new Set(['HeapProfiler.enable', 'HeapProfiler.collectGarbage', 'HeapProfiler.startSampling',
    'HeapProfiler.getSamplingProfile', 'HeapProfiler.stopSampling']);
  if (globalThis[KEY]) globalThis[KEY].close();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'memscope-'));
  const sockPath = path.join(dir, 's');
  const removeFiles = () => {
    try { fs.unlinkSync(sockPath); } catch (e) {}
    try { fs.rmdirSync(dir); } catch (e) {}
  };
  let session = null, conn = null;
  const close = () => {
    try { server.close(); } catch (e) {}
    removeFiles();
    if (conn) conn.destroy();
    if (session) { try { session.disconnect(); } catch (e) {} session = null; }
    if (globalThis[KEY] === self) delete globalThis[KEY];
  };
  const self = { close };
  const serve = (sock) => {
    const send = (kind, payload) => {
      const head = Buffer.alloc(5);
      head[0] = kind;
      head.writeUInt32BE(payload.length, 1);
      sock.write(head);
      sock.write(payload);
    };
    const reply = (m) => send(0x4d, Buffer.from(JSON.stringify(m)));
    const handle = (req) => {
      const id = req.id;
      if (req.op === 'snapshot') {
        let s;
        try { s = v8.getHeapSnapshot(); } catch (e) { return reply({ id, error: String(e) }); }
        s.on('data', (c) => send(0x44, c));
        s.on('end', () => reply({ id, result: {} }));
        s.on('error', (e) => reply({ id, error: String(e) }));
      } else if (req.op === 'call' && METHODS.has(req.method)) {
        if (!session) {
          session = new inspector.Session();
          session.connect();
          session.on('inspectorNotification', (m) => reply({ method: m.method, params: m.params }));
        }
        session.post(req.method, req.params || {}, (err, result) => reply(err ? { id, error: String(err.message || err) } : { id, result }));
      } else {
        reply({ id, error: 'not allowed' });
      }
    };
    let buf = '', authed = false;
    sock.setEncoding('utf8');
    sock.on('data', (d) => {
      buf += d;
      if (buf.length > 65536) return sock.destroy();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!authed) {
          const a = Buffer.from(line), b = Buffer.from(TOKEN);
          if (a.length !== b.length || !crypto.timingSafeEqual(a, b)) return sock.destroy();
          authed = true;
          conn = sock;
          clearTimeout(expiry);
          server.close();
          removeFiles();
          reply({ ok: true, pid: process.pid });
          continue;
        }
        let req;
        try { req = JSON.parse(line); } catch (e) { return sock.destroy(); }
        handle(req);
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => { if (conn === sock) close(); });
  };
  const server = net.createServer((sock) => {
    sock.unref();
    if (conn) return sock.destroy();
    serve(sock);
  });
  server.on('error', close);
  server.listen(sockPath, () => { try { fs.chmodSync(sockPath, 0o600); } catch (e) {} });
  server.unref();
  const expiry = setTimeout(close, __MEMSCOPE_EXPIRY_MS__);
  expiry.unref();
  globalThis[KEY] = self;
  return sockPath;
})()
