package org.fwdfed.app;

import android.app.Notification;
import android.app.NotificationChannel;
import android.app.NotificationManager;
import android.content.Context;
import android.content.pm.ServiceInfo;
import android.os.Build;

import androidx.annotation.NonNull;
import androidx.core.app.NotificationCompat;
import androidx.work.Constraints;
import androidx.work.Data;
import androidx.work.ExistingWorkPolicy;
import androidx.work.ForegroundInfo;
import androidx.work.NetworkType;
import androidx.work.OneTimeWorkRequest;
import androidx.work.WorkManager;
import androidx.work.Worker;
import androidx.work.WorkerParameters;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.util.List;

import org.fwdfed.core.Batch;
import org.fwdfed.core.BatchEncoder;
import org.fwdfed.core.DeviceClient;
import org.fwdfed.core.DeviceStatus;
import org.fwdfed.core.Manifest;
import org.fwdfed.core.MemoryPlan;
import org.fwdfed.core.MemorySize;
import org.fwdfed.core.ProcStatus;
import org.fwdfed.core.SeedStream;
import org.fwdfed.core.TaskTrainer;
import org.fwdfed.core.Tokenizer;
import org.fwdfed.core.TrainingData;

/**
 * Training as a WorkManager job: it runs only while the phone is charging and on an unmetered
 * network (what users of on-device learning expect), as a foreground job with a notification,
 * and stops cleanly between two training steps when the user presses Stop or a constraint goes
 * away (WorkManager calls onStopped). Progress (connection state, round, loss, peak memory,
 * bytes) goes to the screen through WorkManager's progress data.
 *
 * The bundle (model.pte, manifest.json, adapter_init.f32, tokenizer/) and the device's data
 * (train.txt) are read from the app's files directory: `adb push` puts them there (README.md).
 */
public final class TrainingWorker extends Worker {
    static final String WORK_NAME = "fwdfed-training";
    static final String CHANNEL = "training";
    static final String KEY_URL = "url";
    static final String KEY_TOKEN = "token";
    static final String KEY_DEVICE = "device_id";
    static final String KEY_BUDGET = "budget";
    static final String KEY_CA = "ca_pem";

    private volatile DeviceClient client;

    public TrainingWorker(@NonNull Context context, @NonNull WorkerParameters params) {
        super(context, params);
    }

    /** Queue the job; it starts when the phone is charging on Wi-Fi (or another unmetered network). */
    static void schedule(Context context, Data input) {
        Constraints constraints = new Constraints.Builder()
                .setRequiresCharging(true)
                .setRequiredNetworkType(NetworkType.UNMETERED)
                .build();
        OneTimeWorkRequest request = new OneTimeWorkRequest.Builder(TrainingWorker.class)
                .setConstraints(constraints)
                .setInputData(input)
                .build();
        WorkManager.getInstance(context).enqueueUniqueWork(WORK_NAME, ExistingWorkPolicy.REPLACE, request);
    }

    static void cancel(Context context) {
        WorkManager.getInstance(context).cancelUniqueWork(WORK_NAME);
    }

    @NonNull
    @Override
    public Result doWork() {
        setForegroundAsync(foregroundInfo());
        Data in = getInputData();
        File files = getApplicationContext().getExternalFilesDir(null);
        File bundle = new File(files, "bundle");
        ExecuTorchLossProgram program = null;
        try {
            Manifest manifest = Manifest.load(bundle.toPath());
            String budgetText = in.getString(KEY_BUDGET);
            Long budget = budgetText == null || budgetText.isEmpty() ? null : MemorySize.parse(budgetText);
            long runtime = ProcStatus.currentRss();
            List<String> texts = TrainingData.shard(new File(files, "train.txt").toPath(), 0, 0, 1);
            if (budget != null) {  // refused before the program is loaded, saying what would fit
                int n = Math.max(1, manifest.maxPerturbations / 2);
                MemoryPlan.plan(manifest, budget, texts.size(), n, 1 + 3 * n, runtime);
            }
            Tokenizer tokenizer = Tokenizer.load(manifest.tokenizerPath());
            List<Batch> batches = BatchEncoder.encode(tokenizer, texts, null, manifest.task, manifest.batchSize,
                    manifest.seqLen);
            program = new ExecuTorchLossProgram(manifest.programPath().toString(), manifest.maxPerturbations,
                    Manifest.SEQ_CLS.equals(manifest.task));
            String deviceId = in.getString(KEY_DEVICE);
            TaskTrainer trainer = new TaskTrainer(manifest, program, batches, texts.size(), budget, runtime,
                    (round, wave) -> new SeedStream(0, round, wave, deviceId), ProcStatus::peakRss);
            String ca = in.getString(KEY_CA);
            DeviceClient.Config config = new DeviceClient.Config(in.getString(KEY_URL), in.getString(KEY_TOKEN),
                    ca == null ? null : ca.getBytes(StandardCharsets.US_ASCII), deviceId, budget, 120_000);
            client = new DeviceClient(config, manifest, trainer, this::publish, DeviceClient.FrameRecorder.NONE);
            client.run();
            return Result.success();
        } catch (Exception e) {  // a DeviceException, a bundle or data problem: shown, not retried
            publish(new DeviceStatus(DeviceStatus.State.FAILED, 0, Double.NaN, Double.NaN, ProcStatus.peakRss(), 0, 0,
                    0, e.getMessage()));
            return Result.failure(new Data.Builder().putString("error", String.valueOf(e.getMessage())).build());
        } finally {
            if (program != null) {
                program.close();
            }
        }
    }

    @Override
    public void onStopped() {
        DeviceClient c = client;
        if (c != null) {
            c.stop();  // ends between two steps; nothing half-sent
        }
    }

    private void publish(DeviceStatus s) {
        setProgressAsync(new Data.Builder()
                .putString("state", s.state.name())
                .putLong("round", s.round)
                .putDouble("loss_before", s.lossBefore)
                .putDouble("loss_after", s.lossAfter)
                .putLong("peak", s.peakRssBytes)
                .putLong("sent", s.bytesSent)
                .putLong("received", s.bytesReceived)
                .putInt("accepted", s.updatesAccepted)
                .putString("message", s.message)
                .build());
    }

    private ForegroundInfo foregroundInfo() {
        Context context = getApplicationContext();
        NotificationManager manager = context.getSystemService(NotificationManager.class);
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.O) {
            manager.createNotificationChannel(new NotificationChannel(CHANNEL,
                    context.getString(R.string.channel_name), NotificationManager.IMPORTANCE_LOW));
        }
        Notification notification = new NotificationCompat.Builder(context, CHANNEL)
                .setContentTitle(context.getString(R.string.notification_title))
                .setSmallIcon(android.R.drawable.stat_notify_sync)
                .setOngoing(true)
                .addAction(android.R.drawable.ic_delete, context.getString(R.string.stop),
                        WorkManager.getInstance(context).createCancelPendingIntent(getId()))
                .build();
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.Q) {
            return new ForegroundInfo(1, notification, ServiceInfo.FOREGROUND_SERVICE_TYPE_DATA_SYNC);
        }
        return new ForegroundInfo(1, notification);
    }
}
