package org.fwdfed.app;

import android.content.ComponentName;
import android.content.Context;
import android.content.Intent;
import android.content.ServiceConnection;
import android.os.IBinder;
import android.os.Parcel;
import android.os.Process;
import android.os.RemoteException;

import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.fwdfed.core.DeviceException;
import org.fwdfed.core.ProbeInputs;
import org.fwdfed.core.ProbeVerdict;
import org.fwdfed.core.ProgramProbe;

/**
 * The job's side of the {@link ProbeService}: it binds the service (which starts its `:probe` process),
 * asks it to run the program in one synchronous transaction, and reads the verdict. The transaction fails
 * with a DeadObjectException when the probe's process dies during it: the program crashed the runtime.
 * A probe still running after {@link #TIMEOUT_S} is killed and counts as a crash, as on the JVM and in the
 * Python device. Called on the job's own thread, never the main one (the connection's callbacks come there).
 */
final class ServiceProbe implements ProgramProbe {
    static final long TIMEOUT_S = 600;  // one call of forward (runtime/isolation.py's CHECK_TIMEOUT_S)
    private static final long BIND_TIMEOUT_S = 60;  // the probe's process starting

    private final Context context;

    ServiceProbe(Context context) {
        this.context = context;
    }

    /** The service's binder once bound, or null. */
    private static final class Connection implements ServiceConnection {
        private final CountDownLatch bound = new CountDownLatch(1);
        private volatile IBinder binder;

        @Override
        public void onServiceConnected(ComponentName name, IBinder service) {
            binder = service;
            bound.countDown();
        }

        @Override
        public void onServiceDisconnected(ComponentName name) {
            // The process died; a transaction in flight fails with DeadObjectException and says so.
        }

        IBinder await(long seconds) throws InterruptedException {
            bound.await(seconds, TimeUnit.SECONDS);
            return binder;
        }
    }

    /** Kills the probe's process once the time is up, unless cancelled first. */
    private static final class Watchdog extends Thread {
        private final int pid;
        private volatile boolean fired;

        Watchdog(int pid) {
            super("fwdfed-probe-watchdog");
            this.pid = pid;
            setDaemon(true);
        }

        @Override
        public void run() {
            try {
                Thread.sleep(TimeUnit.SECONDS.toMillis(TIMEOUT_S));
            } catch (InterruptedException e) {
                return;  // cancelled: the probe answered
            }
            fired = true;
            Process.killProcess(pid);
        }
    }

    @Override
    public ProbeVerdict probe(ProbeInputs inputs) throws DeviceException {
        Connection connection = new Connection();
        if (!context.bindService(new Intent(context, ProbeService.class), connection, Context.BIND_AUTO_CREATE)) {
            throw new DeviceException("cannot start the program's probe (ProbeService)");
        }
        Watchdog watchdog = null;
        Parcel data = Parcel.obtain();
        Parcel reply = Parcel.obtain();
        try {
            IBinder binder = connection.await(BIND_TIMEOUT_S);
            if (binder == null) {
                throw new DeviceException("the program's probe (ProbeService) did not start within " + BIND_TIMEOUT_S + " s");
            }
            watchdog = new Watchdog(pid(binder));
            watchdog.start();
            data.writeString(inputs.programPath);
            data.writeString(inputs.initialAdapterPath);
            data.writeInt(inputs.batchSize);
            data.writeInt(inputs.seqLen);
            data.writeInt(inputs.maxPerturbations);
            data.writeInt(inputs.adapterDim);
            data.writeInt(inputs.labelsPerExample ? 1 : 0);
            binder.transact(ProbeService.PROBE, data, reply, 0);
            String refusal = reply.readString();
            long peak = reply.readLong();
            return refusal == null ? ProbeVerdict.ok(peak) : ProbeVerdict.refused(refusal, peak);
        } catch (RemoteException e) {  // DeadObjectException: the probe's process died during the call
            return watchdog != null && watchdog.fired
                    ? ProbeVerdict.crashed("did not finish within " + TIMEOUT_S + " s (killed)")
                    : ProbeVerdict.crashed("died before its verdict");
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new DeviceException("interrupted while the program's probe started");
        } finally {
            if (watchdog != null) {
                watchdog.interrupt();
            }
            data.recycle();
            reply.recycle();
            context.unbindService(connection);
        }
    }

    /** The probe process's id (to kill it if it hangs). */
    private static int pid(IBinder binder) throws RemoteException {
        Parcel data = Parcel.obtain();
        Parcel reply = Parcel.obtain();
        try {
            binder.transact(ProbeService.PID, data, reply, 0);
            return reply.readInt();
        } finally {
            data.recycle();
            reply.recycle();
        }
    }
}
