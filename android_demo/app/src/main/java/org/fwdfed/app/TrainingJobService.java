package org.fwdfed.app;

import android.app.job.JobInfo;
import android.app.job.JobParameters;
import android.app.job.JobScheduler;
import android.app.job.JobService;
import android.content.ComponentName;
import android.content.Context;
import android.content.SharedPreferences;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;

import org.fwdfed.core.BundleDevice;
import org.fwdfed.core.DeviceClient;
import org.fwdfed.core.DeviceException;
import org.fwdfed.core.DeviceStatus;
import org.fwdfed.core.LossProgram;
import org.fwdfed.core.MemorySize;
import org.fwdfed.core.ProcStatus;

/**
 * Training as a JobScheduler job: it runs only while the phone is charging and on an unmetered
 * network (what users of on-device learning expect). When a constraint goes away, the system's
 * time limit for a job passes, or the user presses Stop, the system calls {@link #onStopJob},
 * which asks the device loop to end between two training steps (nothing is half-sent); the job
 * is then rescheduled and starts again, with a new connection, once the constraints hold again
 * (a cancelled job is not).
 *
 * <p>The bundle (model.pte, manifest.json, adapter_init.f32, tokenizer/), the device's data
 * (train.txt) and, optionally, the coordinator's private CA (ca.pem) are read from the app's
 * external files folder, where {@code adb push} puts them (android_demo/README.md). What to
 * connect to comes from the settings the screen saved, so the token never leaves the app's
 * private storage.
 *
 * <p>The program is tried first in the {@link ProbeService}'s own process ({@link ServiceProbe}): one that
 * crashes ExecuTorch's runtime there is not loaded here; the device stays connected and declines its tasks
 * until the bundle is replaced (docs/security.md, Isolated loading).
 *
 * <p>No lambdas here or anywhere in the app: API 23's android.jar has no java.lang.invoke, which
 * javac's lambdas compile to (d8 would desugar them, but javac must compile them first).
 */
public final class TrainingJobService extends JobService {
    static final int JOB_ID = 1;
    static final String SETTINGS = "device";
    static final String KEY_URL = "url";
    static final String KEY_TOKEN = "token";
    static final String KEY_DEVICE = "device_id";
    static final String KEY_BUDGET = "budget";
    private static final long CONNECT_TIMEOUT_MS = 120_000;

    /** The previous job's loop, if it is still ending: a new job waits for it (one device loop at a time). */
    private static Thread last;

    private volatile DeviceClient client;
    private volatile boolean stopped;
    private volatile ExecuTorchLossProgram program;

    /** Queue the job; false if the system refused it. */
    static boolean schedule(Context context) {
        JobInfo job = new JobInfo.Builder(JOB_ID, new ComponentName(context, TrainingJobService.class))
                .setRequiresCharging(true)
                .setRequiredNetworkType(JobInfo.NETWORK_TYPE_UNMETERED)
                .setPersisted(true)  // survives a restart of the phone (RECEIVE_BOOT_COMPLETED)
                .build();
        return context.getSystemService(JobScheduler.class).schedule(job) == JobScheduler.RESULT_SUCCESS;
    }

    static void cancel(Context context) {
        context.getSystemService(JobScheduler.class).cancel(JOB_ID);
    }

    @Override
    public boolean onStartJob(JobParameters params) {
        Thread previous;
        synchronized (TrainingJobService.class) {
            previous = last;
            last = new Thread(new Runnable() {
                @Override
                public void run() {
                    runAfter(previous, params);
                }
            }, "fwdfed-device");
            last.start();
        }
        return true;  // the work goes on in that thread; it calls jobFinished
    }

    @Override
    public boolean onStopJob(JobParameters params) {
        stopped = true;
        DeviceClient c = client;
        if (c != null) {
            c.stop();
        }
        return true;  // run again when the constraints hold again (ignored when the job was cancelled)
    }

    private void runAfter(Thread previous, JobParameters params) {
        try {
            if (previous != null) {
                previous.join();
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return;
        }
        try {
            train();
        } catch (DeviceException | IllegalArgumentException e) {  // a bundle, data, budget or coordinator problem
            StatusBoard.publish(this, new DeviceStatus(DeviceStatus.State.FAILED, 0, Double.NaN, Double.NaN,
                    ProcStatus.peakRss(), 0, 0, 0, e.getMessage()));
        } finally {
            ExecuTorchLossProgram p = program;
            if (p != null) {
                p.close();
            }
            if (!stopped) {
                jobFinished(params, false);  // done, or failed in a way a retry would not mend
            }
        }
    }

    private void train() throws DeviceException {
        SharedPreferences settings = getSharedPreferences(SETTINGS, MODE_PRIVATE);
        File files = getExternalFilesDir(null);
        if (files == null) {
            throw new DeviceException("the app's external files folder is not available (is shared storage mounted?)");
        }
        String budgetText = settings.getString(KEY_BUDGET, "");
        Long budget = budgetText.isEmpty() ? null : MemorySize.parse(budgetText);
        // trust_key.pem, when provisioned: only a bundle the operator signed is opened (docs/security.md).
        BundleDevice device = BundleDevice.open(new File(files, "bundle"), new File(files, "train.txt"),
                settings.getString(KEY_DEVICE, ""), budget, readIfPresent(new File(files, "trust_key.pem")),
                new ServiceProbe(this), new BundleDevice.ProgramOpener() {
                    @Override
                    public LossProgram open(String path, int maxPerturbations, boolean labelsPerExample)
                            throws DeviceException {
                        return openProgram(path, maxPerturbations, labelsPerExample);
                    }
                });
        DeviceClient c = device.client(settings.getString(KEY_URL, ""), emptyToNull(settings.getString(KEY_TOKEN, "")),
                readIfPresent(new File(files, "ca.pem")), CONNECT_TIMEOUT_MS, new DeviceStatus.Listener() {
                    @Override
                    public void onStatus(DeviceStatus s) {
                        StatusBoard.publish(TrainingJobService.this, s);
                    }
                });
        client = c;
        if (stopped) {  // onStopJob came before the client existed
            return;
        }
        if (device.programUnavailable() != null) {
            StatusBoard.publish(this, new DeviceStatus(DeviceStatus.State.CONNECTING, 0, Double.NaN, Double.NaN,
                    ProcStatus.peakRss(), 0, 0, 0, device.programUnavailable()
                    + "; declining tasks until the bundle is replaced"));
        }
        c.run();
    }

    private LossProgram openProgram(String path, int maxPerturbations, boolean labelsPerExample)
            throws DeviceException {
        try {
            program = new ExecuTorchLossProgram(path, maxPerturbations, labelsPerExample);
        } catch (RuntimeException e) {  // ExecuTorch's: an unreadable or incompatible program
            throw new DeviceException(cannotLoad(path, e));
        }
        return program;
    }

    /** ExecuTorch's refusal of a program, in one line (here and in the probe's process). */
    static String cannotLoad(String path, RuntimeException e) {
        return "ExecuTorch could not load " + path + ": " + e.getMessage();
    }

    private static String emptyToNull(String s) {
        return s == null || s.isEmpty() ? null : s;
    }

    /** The file's bytes, or null when it does not exist (java.io: java.nio.file is not in API 23's android.jar). */
    private static byte[] readIfPresent(File file) throws DeviceException {
        if (!file.isFile()) {
            return null;
        }
        try (InputStream in = new FileInputStream(file)) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            byte[] buffer = new byte[8192];
            for (int n; (n = in.read(buffer)) > 0; ) {
                out.write(buffer, 0, n);
            }
            return out.toByteArray();
        } catch (IOException e) {
            throw new DeviceException("cannot read " + file + ": " + e.getMessage());
        }
    }
}
