"""Recipe modules (one per training method) and the named recipe configs in recipes/configs/."""
