"""User-prompt templates of molmo-jax (our own wording) for the tasks the fine-tuned model is
prompted with in varied ways: long captions, pointing and counting.

The template is drawn with `rng.randint(0, len(templates))`. The lists have the same lengths as
the official ones (23 / 43 / 57), so a seeded numpy RandomState consumes the same random numbers
as the official formatter and every later draw of the example (answer choice, style prefix) is
the same; only the wording of the chosen template differs. The first entry of each list is the
one used in debug mode. `{label}` is the lower-cased object label. MOLMO2_TEMPLATES: the Molmo2
SFT lists (point and count styles of images and videos), same rule.
"""

LONG_CAPTION = (
    "Describe the image.",
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What is shown in this image? Be thorough.",
    "Write a detailed caption for the image.",
    "Caption this picture in detail.",
    "Tell me everything you see in this picture.",
    "Provide a long, detailed caption.",
    "Describe what you see.",
    "Describe the picture",
    "describe the picture",
    "Explain what this image shows in detail.",
    "Write a paragraph describing the photo.",
    "What does this photo contain?",
    "Give me a rich description of this image.",
    "Describe every part of this image.",
    "Please write a thorough description of the image.",
    "Study the picture and describe it at length.",
    "What is going on in this picture?",
    "Produce a detailed caption of this image.",
    "Walk me through what this image shows.",
    "Write a complete description of the scene.",
    "Describe the scene in this image.",
)

POINTING = (
    "Point to {label}\nIf there is none, answer that it is not in the image.",
    "Point to the {label}.",
    "Point to every {label} in the picture.",
    "Point at all the {label}.",
    "Where is the {label}? Point to it.",
    "Where are the {label} in this image?",
    "Show the location of the {label}.",
    "Mark each {label} with a point.",
    "Mark the {label}.",
    "Put a point on each {label}.",
    "Indicate where the {label} is.",
    "Indicate every {label} you can find.",
    "Locate {label} in the image.",
    "Locate the {label}",
    "Find {label}.",
    "Find every {label} and point to it.",
    "find the {label}",
    "point to {label}",
    "Can you point to the {label}?",
    "Could you show me where the {label} is?",
    "Please point to any {label} you see.",
    "Please mark all {label} in the image.",
    "I need the positions of the {label}.",
    "Give the positions of all {label}.",
    "Give me points for every {label}.",
    "Which parts of the image show {label}? Point to them.",
    "Point out the {label}.",
    "Point out all the {label} in this photo.",
    "Show me the {label}.",
    "Show me each {label} in the image.",
    "Highlight the {label} with points.",
    "Target: {label}\nPoint to it.",
    "Object to find: {label}.",
    "Search the image for {label} and point to them.",
    "Look for any {label} and mark where they are.",
    "Tell me where the {label} are by pointing.",
    "Where can I find the {label}?",
    "Pinpoint the {label}.",
    "Pinpoint every {label} in the picture.",
    "Use points to show the {label}.",
    "Add a point on top of each {label}.",
    "Are there {label} here? Point to them.",
    "Identify the location of each {label}.",
)

POINT_COUNT = (
    "How many {label} are in the image?",
    "How many {label} can you see?",
    "How many {label} are in this picture?",
    "how many {label} are there",
    "How many {label}",
    "Count up the {label}.",
    "Count the {label} in the image.",
    "Count all {label}.",
    "count the {label}",
    "Count every {label} you can see.",
    "Count each {label} and point to it.",
    "Count the {label} and point to them.",
    "Point to the {label} and count them.",
    "Point to each {label}, then give the count.",
    "Point to all {label} and say how many there are.",
    "Mark every {label} and tell me the total.",
    "Mark each {label} and count them.",
    "What is the number of {label} in the image?",
    "What is the count of {label}?",
    "Tell me the number of {label}.",
    "Tell me how many {label} are in the picture.",
    "Give me the number of {label}.",
    "Give the total number of {label}.",
    "Give the count of {label} in this photo.",
    "Find the {label} and count them.",
    "Find every {label}. What is the total?",
    "Locate the {label} and give their number.",
    "Locate all {label}, then count them.",
    "Can you count the {label}?",
    "Can you count the {label} for me?",
    "Could you tell me how many {label} there are?",
    "Please count the {label}.",
    "Please count the {label} in this image.",
    "I want to know how many {label} there are.",
    "Number of {label}?",
    "Total number of {label}?",
    "{label}: how many?",
    "Object: {label}\nHow many are there?",
    "Object: {label}\nPoint to them and count them.",
    "In this image, how many {label} are visible?",
    "In this picture, count the {label}.",
    "How many {label} can be seen?",
    "How many {label} are shown?",
    "How many {label} appear in the image?",
    "How many {label} does the image contain?",
    "How many {label} do you count?",
    "How many {label} are present?",
    "Are there any {label}? How many?",
    "Are there {label} in the image? Count them.",
    "Is there any {label}? If so, count them.",
    "Count the {label}; say so if there are none.",
    "Count the visible {label} and point to each one.",
    "Point at and count the {label}.",
    "Show each {label} and give the count.",
    "Show me where the {label} are and how many there are.",
    "Where are the {label}, and how many are there?",
    "List the {label} with points and give the total.",
)

TEMPLATES = {"long_caption": LONG_CAPTION, "pointing": POINTING, "point_count": POINT_COUNT}


# Molmo2 SFT (official data_formatter.py GENERAL_PROMPTS_V1 under prompt_templates "uber_model_v2"):
# the same idea, our own wording, list lengths of the official Molmo2 lists so that the
# `rng.randint(0, n)` draw consumes the same numbers: pointing 43, point_count 60, count_then_point 6,
# only_count 6. The video lists are the image ones with "image" / "picture" / "photo" -> "video", as
# the official builds its video_point / video_point_count / video_count / video_count_point lists.
# `{label}` is the label as the formatter passes it (lower-cased for images, as is for videos).
MOLMO2_POINT_COUNT = POINT_COUNT + (
    "Point to every {label} and then count them.",
    "How many {label} are there? Point first, then count.",
    "Count the {label} in the image by pointing to each of them.",
)

MOLMO2_COUNT_THEN_POINT = (
    "How many {label} are there? Then point to them.",
    "Count the {label} first, then point to each one.",
    "Give the number of {label} in the image, then mark them.",
    "First count every {label}, then show where they are.",
    "Tell me how many {label} you see and then point to them.",
    "Count and then locate the {label}.",
)

MOLMO2_ONLY_COUNT = (
    "How many {label} are there?",
    "Count the {label}.",
    "What is the number of {label} in the image?",
    "Give me the count of {label}, without pointing.",
    "Tell me how many {label} there are.",
    "Count every {label} in the picture.",
)


def _video(templates):
    return tuple(t.replace("image", "video").replace("picture", "video").replace("photo", "video") for t in templates)


MOLMO2_TEMPLATES = {
    "pointing": POINTING, "point_count": MOLMO2_POINT_COUNT,
    "video_point": _video(POINTING), "video_point_count": _video(MOLMO2_POINT_COUNT),
    "video_count": _video(MOLMO2_ONLY_COUNT), "video_count_point": _video(MOLMO2_COUNT_THEN_POINT),
}
