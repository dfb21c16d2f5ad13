"""What compliance reads: session summaries, replays, alerts. Reads the
store only; never writes to it except through the agent (access audit)."""
