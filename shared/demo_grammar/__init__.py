"""The demo family's scene grammar (pure Python + numpy): scenes, prompts, the held-out prompt set.

Both sides import it without torch: the edge and the lab to compose and score scenes, the device
to tell a user which words of a prompt the family understands.
"""
