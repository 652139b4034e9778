"""Live sessions: audio pushed as it arrives, the avatar's video handed out as it is made."""
