"""What every floor shares: progress lines, statistics, and the readers of users' files."""
