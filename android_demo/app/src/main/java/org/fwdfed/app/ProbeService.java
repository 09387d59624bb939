package org.fwdfed.app;

import android.app.Service;
import android.content.Intent;
import android.os.Binder;
import android.os.IBinder;
import android.os.Parcel;
import android.os.Process;
import android.os.RemoteException;

import java.io.IOException;

import org.fwdfed.core.ProbeInputs;
import org.fwdfed.core.ProcStatus;

/**
 * The program's probe, in a process of its own (`android:process=":probe"` in AndroidManifest.xml): it
 * loads the bundle's `.pte` with ExecuTorch's {@code Module}, runs `forward` once on inputs of the
 * manifest's shapes ({@link ProbeInputs}) and answers. A program that crashes ExecuTorch's runtime (a
 * segfault or an abort in its native code, which no {@code catch} stops) kills this process, not the
 * training job's: the job's {@link ServiceProbe} sees the binder die and declines its tasks instead.
 *
 * <p>Its binder answers two synchronous transactions, from this app alone (the service is not exported):
 * {@link #PID} (this process's id, so that a probe that hangs can be killed) and {@link #PROBE} (the
 * inputs' fields in, then the refusal's line, null for none, and this process's peak resident memory out).
 * The program is released before the answer: the two processes never hold it at once.
 */
public final class ProbeService extends Service {
    static final int PID = IBinder.FIRST_CALL_TRANSACTION;
    static final int PROBE = IBinder.FIRST_CALL_TRANSACTION + 1;

    @Override
    public IBinder onBind(Intent intent) {
        return new Binder() {
            @Override
            protected boolean onTransact(int code, Parcel data, Parcel reply, int flags) throws RemoteException {
                if (code == PID) {
                    reply.writeInt(Process.myPid());
                    return true;
                }
                if (code != PROBE) {
                    return super.onTransact(code, data, reply, flags);
                }
                ProbeInputs inputs = new ProbeInputs(data.readString(), data.readString(), data.readInt(),
                        data.readInt(), data.readInt(), data.readInt(), data.readInt() != 0);
                reply.writeString(run(inputs));
                reply.writeLong(ProcStatus.peakRss());
                return true;
            }
        };
    }

    /** Null when the program ran; else its refusal, in the words the job's own opener would use. */
    static String run(ProbeInputs inputs) {
        ExecuTorchLossProgram program;
        try {
            program = new ExecuTorchLossProgram(inputs.programPath, inputs.maxPerturbations, inputs.labelsPerExample);
        } catch (RuntimeException e) {  // ExecuTorch's: an unreadable or incompatible program
            return TrainingJobService.cannotLoad(inputs.programPath, e);
        }
        try {
            inputs.runOnce(program);
            return null;
        } catch (RuntimeException | IOException e) {  // ProgramException: forward failed; IOException: the adapter
            return e.getMessage();
        } finally {
            program.close();
        }
    }
}
