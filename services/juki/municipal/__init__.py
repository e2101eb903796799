"""municipal."""
