"""A team's own model package, as it exists before the team meets graceful-ray."""
