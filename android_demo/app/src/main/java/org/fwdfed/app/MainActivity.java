package org.fwdfed.app;

import android.content.SharedPreferences;
import android.os.Bundle;
import android.widget.Button;
import android.widget.EditText;
import android.widget.TextView;

import androidx.appcompat.app.AppCompatActivity;
import androidx.work.Data;
import androidx.work.WorkInfo;
import androidx.work.WorkManager;

import java.util.List;
import java.util.Locale;

import org.fwdfed.core.MemorySize;

/**
 * The screen: where to connect (coordinator URL, device token, device id, memory budget), a
 * switch to train when the phone is charging on an unmetered network, and what the device is
 * doing: connection state, round, local loss, peak memory, bytes sent and received.
 */
public final class MainActivity extends AppCompatActivity {
    private SharedPreferences settings;

    @Override
    protected void onCreate(Bundle saved) {
        super.onCreate(saved);
        setContentView(R.layout.activity_main);
        // The token is a credential: private app storage (not backed up: allowBackup is false).
        settings = getSharedPreferences("device", MODE_PRIVATE);
        EditText url = findViewById(R.id.url);
        EditText token = findViewById(R.id.token);
        EditText deviceId = findViewById(R.id.device_id);
        EditText budget = findViewById(R.id.budget);
        url.setText(settings.getString("url", ""));
        token.setText(settings.getString("token", ""));
        deviceId.setText(settings.getString("device_id", ""));
        budget.setText(settings.getString("budget", "1.5GB"));

        Button start = findViewById(R.id.start);
        start.setOnClickListener(v -> {
            String budgetText = budget.getText().toString().trim();
            try {
                if (!budgetText.isEmpty()) {
                    MemorySize.parse(budgetText);
                }
            } catch (IllegalArgumentException e) {
                show(R.id.message, e.getMessage());
                return;
            }
            settings.edit().putString("url", url.getText().toString().trim())
                    .putString("token", token.getText().toString().trim())
                    .putString("device_id", deviceId.getText().toString().trim())
                    .putString("budget", budgetText).apply();
            TrainingWorker.schedule(this, new Data.Builder()
                    .putString(TrainingWorker.KEY_URL, settings.getString("url", ""))
                    .putString(TrainingWorker.KEY_TOKEN, settings.getString("token", ""))
                    .putString(TrainingWorker.KEY_DEVICE, settings.getString("device_id", ""))
                    .putString(TrainingWorker.KEY_BUDGET, budgetText)
                    .build());
            show(R.id.state, "waiting for charging and an unmetered network");
        });
        Button stop = findViewById(R.id.stop);
        stop.setOnClickListener(v -> TrainingWorker.cancel(this));

        WorkManager.getInstance(this).getWorkInfosForUniqueWorkLiveData(TrainingWorker.WORK_NAME)
                .observe(this, this::render);
    }

    private void render(List<WorkInfo> infos) {
        if (infos == null || infos.isEmpty()) {
            return;
        }
        WorkInfo info = infos.get(0);
        Data p = info.getProgress();
        if (p.getString("state") == null) {
            show(R.id.state, info.getState().name().toLowerCase(Locale.ROOT));
            String error = info.getOutputData().getString("error");
            if (error != null) {
                show(R.id.message, error);
            }
            return;
        }
        show(R.id.state, p.getString("state").toLowerCase(Locale.ROOT) + " (" + p.getInt("accepted", 0)
                + " updates accepted)");
        show(R.id.round, "round " + p.getLong("round", 0));
        show(R.id.loss, String.format(Locale.ROOT, "local loss %.4f -> %.4f", p.getDouble("loss_before", Double.NaN),
                p.getDouble("loss_after", Double.NaN)));
        show(R.id.memory, "peak memory " + MemorySize.format(p.getLong("peak", 0)));
        show(R.id.traffic, String.format(Locale.ROOT, "sent %,d B, received %,d B", p.getLong("sent", 0),
                p.getLong("received", 0)));
        show(R.id.message, p.getString("message"));
    }

    private void show(int id, String text) {
        ((TextView) findViewById(id)).setText(text);
    }
}
