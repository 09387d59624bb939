package org.fwdfed.core;

import java.net.InetAddress;
import java.net.URI;
import java.net.URISyntaxException;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.Response;
import okhttp3.WebSocket;
import okhttp3.WebSocketListener;
import okio.ByteString;

/**
 * One websocket to the coordinator, through OkHttp (the same class runs on the JVM and on
 * Android): the handshake carries the device's credential ({@link DeviceCredential}); wss:// is verified with
 * {@link TlsTrust}. OkHttp's reader thread turns what arrives into {@link Event}s on a queue
 * (and answers the coordinator's pings by itself, also while the device trains), so the device
 * loop reads them in order on its own thread.
 */
public final class CoordinatorConnection implements AutoCloseable {
    /** What happened on the connection. */
    public static final class Event {
        public enum Kind { OPENED, FRAME, TEXT, CLOSED, FAILED }

        public final Kind kind;
        public final byte[] frame;  // FRAME
        public final int httpStatus;  // FAILED in the handshake: its HTTP status, else 0
        public final String detail;  // CLOSED: the reason; FAILED: the error or the response body
        public final Throwable error;  // FAILED
        public final String challenge;  // FAILED with 401: the response's WWW-Authenticate, or null

        private Event(Kind kind, byte[] frame, int httpStatus, String detail, Throwable error) {
            this(kind, frame, httpStatus, detail, error, null);
        }

        private Event(Kind kind, byte[] frame, int httpStatus, String detail, Throwable error, String challenge) {
            this.kind = kind;
            this.frame = frame;
            this.httpStatus = httpStatus;
            this.detail = detail;
            this.error = error;
            this.challenge = challenge;
        }
    }

    private final BlockingQueue<Event> events = new LinkedBlockingQueue<>();
    private final WebSocket socket;
    private final AtomicLong bytesSent;
    private final AtomicLong bytesReceived;

    private CoordinatorConnection(OkHttpClient client, Request request, AtomicLong bytesSent, AtomicLong bytesReceived) {
        this.bytesSent = bytesSent;
        this.bytesReceived = bytesReceived;
        this.socket = client.newWebSocket(request, new WebSocketListener() {
            @Override
            public void onOpen(WebSocket ws, Response response) {
                events.add(new Event(Event.Kind.OPENED, null, 0, null, null));
            }

            @Override
            public void onMessage(WebSocket ws, ByteString bytes) {
                bytesReceived.addAndGet(bytes.size());
                events.add(new Event(Event.Kind.FRAME, bytes.toByteArray(), 0, null, null));
            }

            @Override
            public void onMessage(WebSocket ws, String text) {
                events.add(new Event(Event.Kind.TEXT, null, 0, text, null));
            }

            @Override
            public void onClosing(WebSocket ws, int code, String reason) {
                ws.close(1000, null);
                events.add(new Event(Event.Kind.CLOSED, null, code, reason, null));
            }

            @Override
            public void onFailure(WebSocket ws, Throwable t, Response response) {
                int status = response == null ? 0 : response.code();
                String body = null;
                if (response != null && response.body() != null) {
                    try {
                        body = response.body().string();
                    } catch (java.io.IOException | IllegalStateException ignored) {
                        body = null;
                    }
                }
                String challenge = response == null ? null : response.header("WWW-Authenticate");
                events.add(new Event(Event.Kind.FAILED, null, status, body != null ? body.trim() : String.valueOf(t), t,
                        challenge));
            }
        });
    }

    /**
     * Start the handshake with `authorization` as its `Authorization` header (none: null); the first event
     * says whether it opened. A device with a credential never talks ws:// to another host: refused here.
     */
    public static CoordinatorConnection open(OkHttpClient client, String url, boolean credential, String authorization,
                                             AtomicLong bytesSent, AtomicLong bytesReceived) throws DeviceException {
        URI uri;
        try {
            uri = new URI(url);
        } catch (URISyntaxException e) {
            throw new DeviceException("'" + url + "' is not a websocket URL (ws://host:port)");
        }
        String scheme = uri.getScheme();
        if (uri.getHost() == null || !("ws".equals(scheme) || "wss".equals(scheme))) {
            throw new DeviceException("'" + url + "' is not a websocket URL (ws://host:port)");
        }
        Request.Builder request = new Request.Builder().url(url);
        if ((credential || authorization != null) && "ws".equals(scheme) && !isLoopback(uri.getHost())) {
            throw new DeviceException("refusing to send this device's credential unencrypted to " + uri.getHost()
                    + ": use wss://");
        }
        if (authorization != null) {
            request.header("Authorization", authorization);
        }
        return new CoordinatorConnection(client, request.build(), bytesSent, bytesReceived);
    }

    /** An address that never leaves this machine (fwdfed/net.py): "localhost" or a loopback IP literal. */
    static boolean isLoopback(String host) {
        if ("localhost".equals(host)) {
            return true;
        }
        String h = host.startsWith("[") ? host.substring(1, host.length() - 1) : host;
        if (!h.matches("[0-9.]+") && !h.contains(":")) {
            return false;  // a name: not resolved here, so never counted as loopback
        }
        try {
            return InetAddress.getByName(h).isLoopbackAddress();
        } catch (java.net.UnknownHostException e) {
            return false;
        }
    }

    /** The next event, or null after `timeoutMs`. */
    public Event next(long timeoutMs) throws InterruptedException {
        return events.poll(timeoutMs, TimeUnit.MILLISECONDS);
    }

    /** Queue one binary frame; false when the connection is closing or gone. */
    public boolean send(byte[] frame) {
        boolean queued = socket.send(ByteString.of(frame));
        if (queued) {
            bytesSent.addAndGet(frame.length);
        }
        return queued;
    }

    @Override
    public void close() {
        socket.close(1000, null);
    }

    /** Drop the connection at once (tests, and a device that is being stopped). */
    public void cancel() {
        socket.cancel();
    }
}
