package org.fwdfed.core;

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;

import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLSocketFactory;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509TrustManager;

/**
 * Whom the device trusts for wss://: the system's certificate authorities, and optionally a
 * private CA given as PEM (`--ca-file`, as device_sdk does). A server certificate that neither
 * signed is refused in the TLS handshake, before the credential is sent.
 */
public final class TlsTrust {
    public final X509TrustManager trustManager;
    public final SSLSocketFactory socketFactory;

    private TlsTrust(X509TrustManager trustManager) throws GeneralSecurityException {
        this.trustManager = trustManager;
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(null, new TrustManager[] {trustManager}, null);
        this.socketFactory = context.getSocketFactory();
    }

    /** The system's CAs, and those of `caPem` (one or more PEM certificates) when it is not null. */
    public static TlsTrust of(byte[] caPem) throws DeviceException {
        try {
            List<X509TrustManager> managers = new ArrayList<>();
            if (caPem != null) {
                Collection<? extends Certificate> certs = CertificateFactory.getInstance("X.509")
                        .generateCertificates(new ByteArrayInputStream(caPem));
                if (certs.isEmpty()) {
                    throw new DeviceException("the CA file holds no certificate");
                }
                KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
                store.load(null, null);
                int i = 0;
                for (Certificate c : certs) {
                    store.setCertificateEntry("ca-" + i++, c);
                }
                managers.add(managerOf(store));
            }
            managers.add(managerOf(null));  // the system's
            return new TlsTrust(new AnyOf(managers));
        } catch (GeneralSecurityException | IOException e) {
            throw new DeviceException("cannot use the CA file: " + e.getMessage());
        }
    }

    private static X509TrustManager managerOf(KeyStore store) throws GeneralSecurityException {
        TrustManagerFactory factory = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        factory.init(store);
        for (TrustManager m : factory.getTrustManagers()) {
            if (m instanceof X509TrustManager) {
                return (X509TrustManager) m;
            }
        }
        throw new GeneralSecurityException("no X.509 trust manager");
    }

    /** Trusts a chain when any of its managers does. */
    private static final class AnyOf implements X509TrustManager {
        private final List<X509TrustManager> managers;

        AnyOf(List<X509TrustManager> managers) {
            this.managers = managers;
        }

        @Override
        public void checkServerTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            CertificateException last = null;
            for (X509TrustManager m : managers) {
                try {
                    m.checkServerTrusted(chain, authType);
                    return;
                } catch (CertificateException e) {
                    last = e;
                }
            }
            throw last;
        }

        @Override
        public void checkClientTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            throw new CertificateException("this device authenticates no clients");
        }

        @Override
        public X509Certificate[] getAcceptedIssuers() {
            List<X509Certificate> all = new ArrayList<>();
            for (X509TrustManager m : managers) {
                all.addAll(List.of(m.getAcceptedIssuers()));
            }
            return all.toArray(new X509Certificate[0]);
        }
    }
}
