package org.fwdfed.core;

import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import okhttp3.OkHttpClient;

/**
 * The device loop of docs/protocol.md, as device_sdk/client.py runs it: connect (with the
 * credential), send `hello`, and answer every `task` with an `update` until `done`.
 *
 * - A lost connection is reconnected with backoff (0.2 s doubling to 2 s) until
 *   `connectTimeoutMs` passes without success.
 * - An update not yet acknowledged is kept; after a reconnect it is sent again (once per
 *   connection), also when the coordinator sends its task again, without training twice. A
 *   `duplicate` refusal of a resent update means the first copy was accepted.
 * - An `error` from the coordinator (revoked, wrong model, ...), a refused credential, an
 *   untrusted certificate, a frame that breaks the protocol or a task the device cannot use
 *   stops the device with a {@link DeviceException} saying why; for such a task it sends only a
 *   `decline` (so that the task goes to another device at once), never an update.
 * - {@link #stop()} ends the loop between training steps (the user's switch, or the OS taking
 *   the job's constraints away).
 * - It keeps the adapter of its last task and names it in its `hello`, so that a task may carry
 *   the versions since in seed form (docs/protocol.md, Downlink in seed form): it replays them
 *   ({@link Replay}) and checks the task's sha256; on a mismatch it drops what it kept and
 *   reconnects, and the same task comes again with the dense adapter. It never trains on a
 *   wrong adapter. {@link #keepAdapter(boolean)} false makes it an older device: dense tasks.
 * - With a {@link ProbedProgram} ({@link #program}) whose program crashed the process that tried it,
 *   it does not stop: it declines each task (`cannot_run`, the crash's line) and stays up, the bundle
 *   read and probed again before each task, until one loads (docs/security.md, Isolated loading).
 */
public final class DeviceClient {
    /** How to reach the coordinator and who this device is. */
    public static final class Config {
        public final String url;
        // The device's Ed25519 private key (PKCS#8 PEM, from `coordinator enrol`), or a bearer token
        // (`enrol --bearer`); null: no credential (a coordinator run with --auth none). See DeviceCredential.
        public final String token;
        public final byte[] caPem;  // null: the system's CAs only
        public final String deviceId;
        public final Long memBudgetBytes;
        public final long connectTimeoutMs;

        public Config(String url, String token, byte[] caPem, String deviceId, Long memBudgetBytes,
                      long connectTimeoutMs) {
            this.url = url;
            this.token = token;
            this.caPem = caPem;
            this.deviceId = deviceId;
            this.memBudgetBytes = memBudgetBytes;
            this.connectTimeoutMs = connectTimeoutMs;
        }
    }

    /** Sees every frame as it is sent or received (a test's record; an app's traffic log). */
    public interface FrameRecorder {
        void sent(byte[] frame);

        void received(byte[] frame);

        FrameRecorder NONE = new FrameRecorder() {
            @Override public void sent(byte[] frame) { }
            @Override public void received(byte[] frame) { }
        };
    }

    /** Thrown out of a training step when the device is being stopped. */
    private static final class Stopped extends RuntimeException {
        private static final long serialVersionUID = 1L;
    }

    private static final long POLL_MS = 200;

    private final Config config;
    private final Manifest manifest;
    private final TaskTrainer trainer;
    private final DeviceStatus.Listener listener;
    private final FrameRecorder recorder;
    private final OkHttpClient http;
    private final AtomicLong bytesSent = new AtomicLong();
    private final AtomicLong bytesReceived = new AtomicLong();
    private volatile boolean stopped;
    private volatile CoordinatorConnection current;

    private Message.Update pending;  // sent, not yet acknowledged
    private int accepted;
    private long round;
    private double lossBefore = Double.NaN;
    private double lossAfter = Double.NaN;
    private boolean keepAdapter = true;
    private long heldVersion;
    private float[] heldAdapter;  // null: holds none
    private int resyncs;
    private ProbedProgram probed;  // null: the program was opened in this process without a probe
    private String declined;  // the task last declined while the program was unavailable, until its ack

    public DeviceClient(Config config, Manifest manifest, TaskTrainer trainer, DeviceStatus.Listener listener,
                        FrameRecorder recorder) throws DeviceException {
        this.config = config;
        this.manifest = manifest;
        this.trainer = trainer;
        this.listener = listener;
        this.recorder = recorder;
        OkHttpClient.Builder builder = new OkHttpClient.Builder()
                .connectTimeout(10, TimeUnit.SECONDS)
                .readTimeout(0, TimeUnit.MILLISECONDS)  // a device may hear nothing for a long round
                .writeTimeout(30, TimeUnit.SECONDS);
        if (config.url.startsWith("wss://")) {
            TlsTrust trust = TlsTrust.of(config.caPem);
            builder.sslSocketFactory(trust.socketFactory, trust.trustManager);
        }
        this.http = builder.build();
    }

    /** Whether to keep the last task's adapter for seed-form tasks (default true); call before {@link #run()}. */
    public DeviceClient keepAdapter(boolean keep) {
        this.keepAdapter = keep;
        return this;
    }

    /** The trainer's program, when it was probed: while it cannot be loaded, tasks are declined, not fatal. */
    public DeviceClient program(ProbedProgram program) {
        this.probed = program;
        return this;
    }

    /** Tasks whose history did not replay to their sha256 (each then came again with the dense adapter). */
    public int resyncs() {
        return resyncs;
    }

    /** Ask the loop to end; a training step in progress finishes first. Safe from any thread. */
    public void stop() {
        stopped = true;
        CoordinatorConnection c = current;
        if (c != null) {
            c.close();
        }
    }

    /** Serve tasks until the job is done (or {@link #stop()}); returns the updates accepted. */
    public int run() throws DeviceException {
        try {
            while (!stopped) {
                CoordinatorConnection connection = connect();
                if (connection == null) {
                    break;  // stopped while connecting
                }
                current = connection;
                try {
                    if (session(connection)) {
                        report(DeviceStatus.State.DONE, "the job is done");
                        return accepted;
                    }
                } finally {
                    connection.close();
                    current = null;
                }
                if (!stopped) {
                    report(DeviceStatus.State.CONNECTING, "connection lost, reconnecting");
                }
            }
        } catch (DeviceException e) {
            report(DeviceStatus.State.FAILED, e.getMessage());
            throw e;
        } catch (Stopped e) {
            // fall through: stopped between two steps, nothing of the task was sent
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            http.dispatcher().executorService().shutdown();
            http.connectionPool().evictAll();
        }
        report(DeviceStatus.State.STOPPED, "stopped");
        return accepted;
    }

    /** An open connection, retrying with backoff; null when stopped; DeviceException for what retrying cannot fix. */
    private CoordinatorConnection connect() throws DeviceException, InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(config.connectTimeoutMs);
        long delayMs = 200;
        String lastError = "no attempt";
        report(DeviceStatus.State.CONNECTING, "connecting to " + config.url);
        DeviceCredential credential = DeviceCredential.of(config.token);
        String authorization = credential == null ? null : credential.firstAuthorization();
        int answers = 0;  // challenges answered in a row: a coordinator that takes none of them is refusing
        while (!stopped && System.nanoTime() < deadline) {
            CoordinatorConnection c = CoordinatorConnection.open(http, config.url, credential != null, authorization,
                    bytesSent, bytesReceived);
            CoordinatorConnection.Event e = null;
            while (!stopped && e == null) {
                e = c.next(POLL_MS);
            }
            if (e == null) {
                c.cancel();
                return null;
            }
            if (e.kind == CoordinatorConnection.Event.Kind.OPENED) {
                return c;
            }
            if (e.httpStatus == 401 && credential != null && credential.signs() && e.challenge != null && answers < 3) {
                // The challenge (or a new one, the last answer having come too late): sign it, at once.
                authorization = credential.answer(e.challenge, config.deviceId, System.currentTimeMillis() / 1000);
                answers++;
                continue;
            }
            if (e.httpStatus == 401 || e.httpStatus == 403) {
                throw new DeviceException("the coordinator refused this device's credential: "
                        + shorten(e.detail, 200));
            }
            authorization = credential == null ? null : credential.firstAuthorization();
            answers = 0;
            if (e.error instanceof javax.net.ssl.SSLHandshakeException || e.error instanceof javax.net.ssl.SSLPeerUnverifiedException) {
                throw new DeviceException("the coordinator's TLS certificate is not trusted: " + rootCause(e.error)
                        + " (give the CA that signed it)");
            }
            lastError = e.httpStatus != 0 ? "HTTP " + e.httpStatus + " " + shorten(e.detail, 200) : String.valueOf(e.error);
            Thread.sleep(delayMs);  // 503 (the coordinator is full for now), refused, reset: try again
            delayMs = Math.min(delayMs * 2, 2000);
        }
        if (stopped) {
            return null;
        }
        throw new DeviceException("cannot reach the coordinator at " + config.url + " within "
                + config.connectTimeoutMs / 1000.0 + " s (" + lastError + ")");
    }

    /** One connection's life: true when the job is done, false when the connection was lost. */
    private boolean session(CoordinatorConnection c) throws DeviceException, InterruptedException {
        send(c, hello());
        boolean resent = false;
        while (true) {
            CoordinatorConnection.Event e = c.next(POLL_MS);
            if (stopped) {
                throw new Stopped();
            }
            if (e == null) {
                continue;
            }
            switch (e.kind) {
                case CLOSED:
                case FAILED:
                    return false;
                case TEXT:
                    throw new DeviceException("the coordinator sent a bad frame: frames must be binary msgpack, not text");
                case OPENED:
                    continue;
                default:
                    break;
            }
            recorder.received(e.frame);
            Message message;
            try {
                message = Codec.decode(e.frame);
            } catch (ProtocolException ex) {
                throw new DeviceException("the coordinator sent a bad frame: " + ex.getMessage());
            }
            if (message instanceof Message.Welcome) {
                report(DeviceStatus.State.CONNECTED, "enrolled in job " + ((Message.Welcome) message).jobId);
                if (pending != null) {
                    resent = send(c, pending);
                }
            } else if (message instanceof Message.Task) {
                Message.Task task = (Message.Task) message;
                if (pending != null && pending.taskId.equals(task.taskId)) {
                    if (!resent) {  // the coordinator sent the task again: the answer is already made
                        resent = send(c, pending);
                    }
                    continue;
                }
                if (task.history != null) {
                    Message.Task dense = replayed(task);
                    if (dense == null) {  // this connection ends; the next hello holds nothing: the task comes dense
                        resyncs++;
                        report(DeviceStatus.State.CONNECTING, "task " + task.taskId + ": its history did not "
                                + "replay to its sha256; reconnecting for the dense adapter");
                        return false;
                    }
                    task = dense;
                }
                if (unavailable(c, task)) {
                    continue;
                }
                round = task.round;
                report(DeviceStatus.State.TRAINING, "round " + task.round + ": training");
                Message.Update update;
                try {
                    update = trainer.train(task, () -> {
                        if (stopped) {
                            throw new Stopped();
                        }
                    });
                } catch (ProgramException ex) {
                    throw decline(c, task, new DeviceException("task " + task.taskId + ": " + ex.getMessage()));
                } catch (DeviceException ex) {
                    throw decline(c, task, ex);
                }
                if (keepAdapter) {  // its adapter passed the trainer's checks: the version this device holds now
                    heldVersion = task.globalVersion;
                    heldAdapter = Replay.floats(task.adapter);
                }
                lossBefore = update.lossBefore;
                lossAfter = update.lossAfter;
                pending = update;
                resent = send(c, update);  // if the connection is gone, it goes again after the reconnect
                report(DeviceStatus.State.CONNECTED, "round " + task.round + ": update sent");
            } else if (message instanceof Message.Ack) {
                Message.Ack ack = (Message.Ack) message;
                if (ack.taskId.equals(declined)) {
                    declined = null;
                    report(DeviceStatus.State.CONNECTED, "decline of " + ack.taskId + " "
                            + (ack.accepted ? "recorded" : "refused: " + ack.reason));
                    continue;
                }
                if (pending != null && pending.taskId.equals(ack.taskId)) {
                    boolean firstCopyAccepted = !ack.accepted && "duplicate".equals(ack.code());
                    if (ack.accepted || firstCopyAccepted) {
                        accepted++;
                    }
                    pending = null;
                }
                report(DeviceStatus.State.CONNECTED, "update " + ack.taskId + " "
                        + (ack.accepted ? "accepted" : "refused: " + ack.reason));
            } else if (message instanceof Message.Done) {
                return true;
            } else if (message instanceof Message.Error) {
                Message.Error error = (Message.Error) message;
                throw new DeviceException("the coordinator refused this device (" + error.code + "): " + error.message);
            } else {
                throw new DeviceException("the coordinator sent a bad frame: a " + message.type()
                        + " message goes from devices to the coordinator");
            }
        }
    }

    private Message.Hello hello() {
        if (!keepAdapter) {
            return new Message.Hello(config.deviceId, manifest.baseModelHash, manifest.adapterDim,
                    trainer.numExamples(), config.memBudgetBytes);
        }
        String sha = heldAdapter == null ? "" : Replay.sha256(Replay.bytes(heldAdapter));
        return new Message.Hello(config.deviceId, manifest.baseModelHash, manifest.adapterDim, trainer.numExamples(),
                config.memBudgetBytes, heldAdapter == null ? 0L : heldVersion, sha);
    }

    /** The task with its history replayed onto the kept adapter, or null (then this device holds nothing): it does
     * not go from the held version to the task's, cannot apply, or does not give the task's sha256. */
    private Message.Task replayed(Message.Task task) {
        float[] held = heldAdapter;
        heldAdapter = null;
        if (held == null || task.history.size() != task.globalVersion - heldVersion) {
            return null;
        }
        for (int k = 0; k < task.history.size(); k++) {
            if (task.history.get(k).version != heldVersion + 1 + k) {
                return null;
            }
        }
        Object kind = task.hparams.getOrDefault("kind", Directions.RADEMACHER);
        byte[] dense;
        try {  // the pool by whose index a version's sums may come packed (a bad one: no replay, the dense task)
            long[] pool = task.history.stream().anyMatch(step -> step.sums != null)
                    ? SeedPool.fromHparams(new Hparams(task.hparams)) : null;
            dense = Replay.bytes(Replay.replay(held, task.history, String.valueOf(kind), pool));
        } catch (IllegalArgumentException e) {
            return null;
        }
        if (!Replay.sha256(dense).equals(task.adapterSha256)) {
            return null;
        }
        heldAdapter = held;  // kept until the trainer's checks pass on the replayed task
        return task.withAdapter(dense);
    }

    /** Say on the wire that this device cannot run `task` (it goes to another device at once); `why` stops it. */
    private DeviceException decline(CoordinatorConnection c, Message.Task task, DeviceException why) {
        sendDecline(c, task.taskId, why.getMessage() == null ? "" : why.getMessage());
        return why;
    }

    /** True when the probed program cannot run `task`: declined (the device stays up), its ack awaited. */
    private boolean unavailable(CoordinatorConnection c, Message.Task task) {
        if (probed == null) {
            return false;
        }
        try {
            probed.ready(task.taskId);
            return false;
        } catch (ProgramUnavailable e) {
            sendDecline(c, task.taskId, e.getMessage());
            declined = task.taskId;
            report(DeviceStatus.State.CONNECTED, "declined: " + e.getMessage());
            return true;
        }
    }

    private void sendDecline(CoordinatorConnection c, String taskId, String reason) {
        int end = reason.offsetByCodePoints(0, Math.min(Message.MAX_TEXT, reason.codePointCount(0, reason.length())));
        send(c, new Message.Decline(taskId, "cannot_run", reason.substring(0, end)));
    }

    private boolean send(CoordinatorConnection c, Message message) {
        byte[] frame = Codec.encode(message);
        boolean queued = c.send(frame);
        if (queued) {
            recorder.sent(frame);
        }
        return queued;
    }

    private void report(DeviceStatus.State state, String message) {
        listener.onStatus(new DeviceStatus(state, round, lossBefore, lossAfter, ProcStatus.peakRss(), bytesSent.get(),
                bytesReceived.get(), accepted, message));
    }

    /** The innermost cause's words: what a person can act on, without the wrappers' class names. */
    private static String rootCause(Throwable t) {
        while (t.getCause() != null && t.getCause() != t) {
            t = t.getCause();
        }
        return t.getMessage() != null ? t.getMessage() : t.getClass().getSimpleName();
    }

    private static String shorten(String s, int n) {
        return s == null ? "" : s.length() <= n ? s : s.substring(0, n);
    }
}
