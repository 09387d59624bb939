package org.fwdfed.app;

import android.app.Activity;
import android.content.SharedPreferences;
import android.os.Bundle;
import android.view.View;
import android.widget.EditText;
import android.widget.TextView;

import org.fwdfed.core.MemorySize;

/**
 * The screen (a plain framework Activity): where to connect (coordinator URL, device token,
 * device id, memory budget), a button to train when the phone is charging on an unmetered
 * network, a Stop button, and what the device is doing: connection state, round, local loss,
 * peak memory, bytes sent and received.
 */
public final class MainActivity extends Activity implements SharedPreferences.OnSharedPreferenceChangeListener {
    private static final int[] STATUS_VIEWS = {R.id.state, R.id.round, R.id.loss, R.id.memory, R.id.traffic,
        R.id.message};

    private SharedPreferences settings;
    // Held in a field: SharedPreferences keeps its listeners weakly.
    private SharedPreferences status;

    @Override
    protected void onCreate(Bundle saved) {
        super.onCreate(saved);
        setContentView(R.layout.activity_main);
        // The token is a credential: private app storage (not backed up: allowBackup is false).
        settings = getSharedPreferences(TrainingJobService.SETTINGS, MODE_PRIVATE);
        status = StatusBoard.of(this);
        EditText url = field(R.id.url, TrainingJobService.KEY_URL, "");
        EditText token = field(R.id.token, TrainingJobService.KEY_TOKEN, "");
        EditText deviceId = field(R.id.device_id, TrainingJobService.KEY_DEVICE, "");
        EditText budget = field(R.id.budget, TrainingJobService.KEY_BUDGET, "1.5GB");

        findViewById(R.id.start).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                start(url, token, deviceId, budget);
            }
        });
        findViewById(R.id.stop).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                TrainingJobService.cancel(MainActivity.this);
                StatusBoard.waiting(MainActivity.this, getString(R.string.stopped));
            }
        });
    }

    /** Save the settings and queue the job; a budget that does not parse is refused here, with the reason. */
    private void start(EditText url, EditText token, EditText deviceId, EditText budget) {
        String budgetText = budget.getText().toString().trim();
        try {
            if (!budgetText.isEmpty()) {
                MemorySize.parse(budgetText);  // refused here, with the reason, rather than in the job
            }
        } catch (IllegalArgumentException e) {
            show(R.id.message, e.getMessage());
            return;
        }
        settings.edit().putString(TrainingJobService.KEY_URL, url.getText().toString().trim())
                .putString(TrainingJobService.KEY_TOKEN, token.getText().toString().trim())
                .putString(TrainingJobService.KEY_DEVICE, deviceId.getText().toString().trim())
                .putString(TrainingJobService.KEY_BUDGET, budgetText)
                .apply();
        if (TrainingJobService.schedule(this)) {
            StatusBoard.waiting(this, getString(R.string.waiting));
        } else {
            show(R.id.message, getString(R.string.refused));
        }
    }

    @Override
    protected void onResume() {
        super.onResume();
        status.registerOnSharedPreferenceChangeListener(this);
        render();
    }

    @Override
    protected void onPause() {
        status.unregisterOnSharedPreferenceChangeListener(this);
        super.onPause();
    }

    @Override
    public void onSharedPreferenceChanged(SharedPreferences preferences, String key) {
        render();
    }

    private void render() {
        String[] lines = StatusBoard.lines(status);
        for (int i = 0; i < STATUS_VIEWS.length; i++) {
            show(STATUS_VIEWS[i], lines[i]);
        }
    }

    private EditText field(int id, String key, String fallback) {
        EditText view = (EditText) findViewById(id);
        view.setText(settings.getString(key, fallback));
        return view;
    }

    private void show(int id, String text) {
        ((TextView) findViewById(id)).setText(text);
    }
}
