// Preload for third-party Node test servers: keep them on the loopback interface.
//
//   node --import ./tests/fakes/loopback.mjs server.js
//
// Patches net.Server.prototype.listen (inherited by http/https servers, so it also covers
// Express's app.listen) so that a TCP listen naming no host (or an empty one) binds 127.0.0.1
// instead of every interface. An explicit host, a pipe/Unix-socket path and an existing
// handle or fd pass through untouched; callbacks and backlog keep working, since only a host
// is filled in.
import net from "node:net";

const HOST = "127.0.0.1";
const originalListen = net.Server.prototype.listen;

// Node treats a string that is not a non-negative number as a pipe name (net.js isPipeName).
const isPipeName = (value) => typeof value === "string" && !(Number(value) >= 0);

function withLoopbackHost(args) {
  const [first] = args;

  // listen(), listen(cb): an arbitrary port on every interface.
  if (args.length === 0 || typeof first === "function") {
    return [0, HOST, ...args];
  }

  // listen(options[, cb]) or listen(handle[, backlog][, cb]).
  if (typeof first === "object" && first !== null) {
    const isHandle = "_handle" in first || "handle" in first || "fd" in first;
    // Node listens on TCP only when "port" is present (even as undefined/null); otherwise
    // it uses options.path or throws, which is left to Node.
    if (isHandle || !("port" in first) || first.host) {
      return args;
    }
    return [{ ...first, host: HOST }, ...args.slice(1)];
  }

  // listen(path[, backlog][, cb]): a pipe, not TCP.
  if (isPipeName(first)) {
    return args;
  }

  // listen(port[, host][, backlog][, cb]), port a number, numeric string, null or undefined.
  if (typeof args[1] === "string" && args[1] !== "") {
    return args; // explicit host
  }
  if (args.length > 1 && (args[1] == null || args[1] === "")) {
    return [first, HOST, ...args.slice(2)]; // listen(port, undefined | null | "", ...)
  }
  return [first, HOST, ...args.slice(1)]; // host inserted before backlog/callback
}

net.Server.prototype.listen = function listen(...args) {
  return originalListen.apply(this, withLoopbackHost(args));
};
