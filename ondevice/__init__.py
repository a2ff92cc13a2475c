"""ondevice: privacy-first personalization on the user's own machine."""
