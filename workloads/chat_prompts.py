"""Fixed chat prompts for checks of the default model's replies (quality, FP8 KV accuracy): short
everyday requests of the kinds ShareGPT holds."""

CHAT_PROMPTS = [
    "Hello, my name is Anna. What is your name?",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a neural network is.",
    "Give me three tips for better sleep.",
    "How do I make a cup of tea?",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a computer store numbers?",
    "Write an email asking my manager for a day off.",
    "What should I see in Paris in two days?",
    "Explain recursion to a child.",
    "List five healthy breakfast ideas.",
    "Why is the sky blue?",
]
